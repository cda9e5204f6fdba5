//! SMTP over TLS (O4): the relay's STARTTLS and implicit-TLS modes against real Mailpits that
//! require them, with a certificate from a test CA made here with `openssl`. The relay trusts
//! the system's roots (rustls-native-certs), which `SSL_CERT_FILE` points at the test CA; this
//! file holds one test so that setting the variable races with no other test in the process.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use switchboard_runtime::attachment_hosts::AttachmentHosts;

use anyhow::{Context, ensure};
use switchboard_delivery::email::{SmtpRelay, SmtpSettings, SmtpTls};
use switchboard_delivery::outcome::SendOutcome;
use switchboard_proto::events::v1::{Author, AuthorKind, OutboundEmail, OutboundMessageQueued};
use switchboard_runtime::outbound::email_message_id;
use switchboard_tests::Mailpit;
use uuid::Uuid;

fn openssl(directory: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("openssl").args(args).current_dir(directory).output().context("failed to run openssl")?;
    ensure!(output.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(())
}

/// A directory removed when dropped, also when the test fails.
struct Certificates(PathBuf);

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA (`ca.pem`) and a server certificate for 127.0.0.1 signed by it (`server.pem`,
/// `server.key`), in a fresh directory.
fn test_certificates() -> anyhow::Result<Certificates> {
    let certificates = Certificates(std::env::temp_dir().join(format!("smtp-tls-{}", Uuid::now_v7().simple())));
    let directory = certificates.0.clone();
    std::fs::create_dir_all(&directory)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=Switchboard test CA"]);
    ca.extend(["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(&directory, &ca)?;
    let mut request = vec!["req"];
    request.extend(ec);
    request.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    openssl(&directory, &request)?;
    std::fs::write(
        directory.join("server.ext"),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )?;
    openssl(
        &directory,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    )?;
    Ok(certificates)
}

fn reply(to: &str) -> OutboundMessageQueued {
    let reply_id = Uuid::now_v7();
    let message_id = email_message_id(reply_id, "support@acme.example");
    OutboundMessageQueued {
        reply_id: reply_id.to_string(),
        author: Some(Author { kind: AuthorKind::Agent as i32, name: "Ana Díaz".into(), ..Default::default() }),
        recipient: to.into(),
        idempotency_key: message_id.clone(),
        email: Some(OutboundEmail {
            from_name: "Acme Support".into(),
            from_address: "support@acme.example".into(),
            to: vec![to.into()],
            subject: "Re: over TLS".into(),
            message_id_header: message_id,
            text_body: "Sent over TLS.".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn relay(host: &str, port: u16, tls: SmtpTls) -> anyhow::Result<SmtpRelay> {
    SmtpRelay::new(SmtpSettings {
        host: host.into(),
        port,
        tls,
        username: Some("agent@acme.example".into()),
        password: Some("secret".into()),
        timeout: Duration::from_secs(5),
        // Attachments come from a local stand-in.
        attachment_hosts: AttachmentHosts::AnyAddress,
    })
}

#[tokio::test]
async fn o4_starttls_and_implicit_tls_relays_receive_over_verified_tls() -> anyhow::Result<()> {
    let certificates = test_certificates()?;
    // SAFETY: the only test of this binary sets it before any TLS configuration is built.
    unsafe { std::env::set_var("SSL_CERT_FILE", certificates.0.join("ca.pem")) };
    let cert = certificates.0.join("server.pem").to_string_lossy().into_owned();
    let key = certificates.0.join("server.key").to_string_lossy().into_owned();

    for (mode, require) in [(SmtpTls::StartTls, "--smtp-require-starttls"), (SmtpTls::Tls, "--smtp-require-tls")] {
        let (mailpit, _process) =
            Mailpit::spawn_with_args(&["--smtp-tls-cert", &cert, "--smtp-tls-key", &key, require]).await?;
        let message = reply(&format!("kim-{}@customer.example", Uuid::now_v7().simple()));
        let message_id = message.email.as_ref().map(|email| email.message_id_header.clone()).unwrap_or_default();

        let outcome = relay("127.0.0.1", mailpit.smtp_port, mode)?.send(&message).await;
        assert_eq!(
            outcome,
            SendOutcome::Sent { provider_message_id: message_id.clone(), status_code: 250 },
            "{mode:?}"
        );
        let received = mailpit.wait_for_message_id(&message_id, Duration::from_secs(10)).await?;
        assert_eq!(received.subject, "Re: over TLS");

        // The certificate names 127.0.0.1, not localhost: a relay reached by another name is
        // not trusted, and nothing is sent.
        let other_name = reply(&format!("kim-{}@customer.example", Uuid::now_v7().simple()));
        match relay("localhost", mailpit.smtp_port, mode)?.send(&other_name).await {
            SendOutcome::Retryable { status_code: 0, .. } => {}
            other => panic!("{mode:?}: a certificate for another name must fail the attempt, got {other:?}"),
        }
        assert_eq!(mailpit.messages().await?.len(), 1, "{mode:?}: only the verified send arrived");
    }
    Ok(())
}
