//! A real client no one on the team wrote: Python's grpcio (from PyPI) with stubs generated from
//! our .proto files authenticates, lists conversations and follows a watch stream (I2 applies:
//! the caller is an agent outside the `vip` inbox).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use switchboard_api::auth::Role;
use switchboard_tests::TestEnv;
use switchboard_tests::api_seed::{self, ACME_CONFIG, append_change, identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_client_authenticates_lists_and_follows_a_watch_stream() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.apply_config(ACME_CONFIG).await?;
    let seeded = api_seed::seed(&env.pool).await?;
    let url = env.start_api_server().await?;
    switchboard_tests::connect_channel(&url).await?;
    let token = switchboard_api::auth::mint_token(
        switchboard_tests::TEST_JWT_SECRET.as_bytes(),
        &identity("outsider", Role::Agent, &[]),
        Duration::from_secs(600),
    )?;
    let before = append_change(&env.pool, "support", seeded.support_assigned, "assigned").await?;
    append_change(&env.pool, "vip", seeded.vip_assigned, "message").await?;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/run_grpcio_client.sh");
    let mut child = Command::new("bash")
        .arg(script)
        .env("API_ADDR", url.trim_start_matches("http://"))
        .env("API_TOKEN", &token)
        .env("API_INBOX", "support")
        .env("EXPECT_CONVERSATIONS", "2")
        .env("WATCH_AFTER", (before - 1).to_string())
        .env("EXPECT_CHANGES", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_sender, mut lines) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_sender.send(line).is_err() {
                break;
            }
        }
    });

    let mut steps = Vec::new();
    let mut live_change_opt = None;
    // First run may create the virtualenv (pip install): allow for it.
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(300), lines.recv()).await {
        let step: serde_json::Value = serde_json::from_str(&line)?;
        if step["step"] == "change" && live_change_opt.is_none() {
            // The stream is open: commit more changes, one the caller may not see (vip).
            append_change(&env.pool, "vip", seeded.vip_unassigned, "assigned").await?;
            live_change_opt = Some(append_change(&env.pool, "support", seeded.support_unassigned, "message").await?);
        }
        steps.push(step);
    }
    let status = child.wait()?;
    assert!(status.success(), "python client failed: {steps:#?}");
    assert_eq!(steps[0]["code"], "UNAUTHENTICATED");
    assert_eq!(steps[1]["ids"], serde_json::json!(["support"]), "I2: vip is not listed");
    assert_eq!(steps[2]["count"], 2);
    let done = steps.last().unwrap();
    assert_eq!(done["step"], "done");
    assert_eq!(done["changes"], serde_json::json!([before, live_change_opt.unwrap()]));
    env.cleanup().await;
    Ok(())
}
