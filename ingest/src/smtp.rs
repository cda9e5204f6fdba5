//! The SMTP listener for team email (spec C1): the RFC 5321 subset a mail relay or client needs
//! to deliver to us. EHLO/HELO, MAIL (with the SIZE extension), RCPT (550 for an address that
//! is not a team address), DATA (dot-unstuffed, size-limited → 552), RSET, NOOP, VRFY, HELP,
//! QUIT. The `250` after DATA is sent only once Kafka acknowledged the events, and a Kafka
//! failure answers `451` so the sending server keeps the mail and retries (B1).
//!
//! The command parser ([`parse_command`]) and the DATA accumulator ([`DataReader`]) are pure,
//! so they are unit- and property-tested without sockets.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use switchboard_runtime::config_store::ConfigStore;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::email;
use crate::error::IngestError;
use crate::intake::Intake;

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    /// The name we greet with.
    pub hostname: String,
    pub max_message_bytes: usize,
    pub max_recipients: usize,
    /// Idle time allowed between commands (RFC 5321 §4.5.3.2 suggests 5 minutes).
    pub command_timeout: Duration,
}

impl Default for SmtpSettings {
    fn default() -> Self {
        SmtpSettings {
            hostname: "switchboard.local".into(),
            max_message_bytes: 25 * 1024 * 1024,
            max_recipients: 100,
            command_timeout: Duration::from_secs(300),
        }
    }
}

/// Longest command line we accept (RFC 5321 §4.5.3.1.4: 512 octets; extensions may add more).
const MAX_COMMAND_LINE: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    /// `MAIL FROM:<reverse-path> [SIZE=n] [BODY=8BITMIME]…`; `<>` is the null sender.
    Mail {
        reverse_path: String,
        declared_size: Option<usize>,
    },
    Rcpt {
        forward_path: String,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    Help,
    /// Verbs we know but do not offer (STARTTLS, AUTH, BDAT…): 502.
    NotImplemented(String),
}

/// A command line that cannot be understood: 500 (unknown verb) or 501 (bad arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyntaxError {
    UnknownCommand,
    BadArguments(&'static str),
}

/// The path inside `<…>` after `FROM:`/`TO:`, and the parameters after it.
fn parse_path<'l>(arguments: &'l str, prefix: &str) -> Result<(&'l str, &'l str), SyntaxError> {
    let bad = SyntaxError::BadArguments("expected `FROM:<address>` / `TO:<address>`");
    let head = arguments.get(..prefix.len()).ok_or(bad.clone())?;
    if !head.eq_ignore_ascii_case(prefix) {
        return Err(bad);
    }
    let rest = arguments[prefix.len()..].trim_start();
    let rest = rest.strip_prefix('<').ok_or(SyntaxError::BadArguments("address must be in angle brackets"))?;
    let close = rest.find('>').ok_or(SyntaxError::BadArguments("unterminated address"))?;
    let path = &rest[..close];
    if path.chars().any(|character| character.is_control() || character == ' ') {
        return Err(SyntaxError::BadArguments("invalid characters in address"));
    }
    // A source route (`@a,@b:user@host`, RFC 5321 §4.1.2) is accepted and ignored.
    let path = path.rsplit_once(':').map_or(path, |(_, mailbox)| mailbox);
    Ok((path, rest[close + 1..].trim()))
}

pub fn parse_command(line: &[u8]) -> Result<Command, SyntaxError> {
    let line = std::str::from_utf8(line).map_err(|_| SyntaxError::BadArguments("command is not UTF-8"))?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (verb, arguments) = match line.split_once(' ') {
        Some((verb, arguments)) => (verb, arguments.trim()),
        None => (line, ""),
    };
    match verb.to_ascii_uppercase().as_str() {
        "HELO" | "EHLO" if arguments.is_empty() => {
            Err(SyntaxError::BadArguments("a domain or address literal is required"))
        }
        "HELO" => Ok(Command::Helo(arguments.to_owned())),
        "EHLO" => Ok(Command::Ehlo(arguments.to_owned())),
        "MAIL" => {
            let (reverse_path, parameters) = parse_path(arguments, "FROM:")?;
            let mut declared_size = None;
            for parameter in parameters.split_whitespace() {
                if let Some(value) =
                    parameter.get(..5).filter(|key| key.eq_ignore_ascii_case("SIZE=")).map(|_| &parameter[5..])
                {
                    declared_size =
                        Some(value.parse().map_err(|_| SyntaxError::BadArguments("SIZE must be a number"))?);
                }
            }
            Ok(Command::Mail { reverse_path: reverse_path.to_owned(), declared_size })
        }
        "RCPT" => {
            let (forward_path, _parameters) = parse_path(arguments, "TO:")?;
            if forward_path.is_empty() {
                return Err(SyntaxError::BadArguments("an empty recipient is not allowed"));
            }
            Ok(Command::Rcpt { forward_path: forward_path.to_owned() })
        }
        "DATA" if arguments.is_empty() => Ok(Command::Data),
        "DATA" => Err(SyntaxError::BadArguments("DATA takes no arguments")),
        "RSET" => Ok(Command::Rset),
        "NOOP" => Ok(Command::Noop),
        "QUIT" => Ok(Command::Quit),
        "VRFY" => Ok(Command::Vrfy),
        "HELP" => Ok(Command::Help),
        verb @ ("STARTTLS" | "AUTH" | "BDAT" | "ETRN" | "EXPN" | "TURN") => {
            Ok(Command::NotImplemented(verb.to_owned()))
        }
        _ => Err(SyntaxError::UnknownCommand),
    }
}

/// Collects the lines of a DATA section: removes the leading dot a client doubles on lines that
/// start with one (RFC 5321 §4.5.2), stops at the lone `.`, and stops storing (but keeps
/// reading) once the message is over the size limit.
#[derive(Debug)]
pub struct DataReader {
    limit: usize,
    message: Vec<u8>,
    too_large: bool,
}

impl DataReader {
    pub fn new(limit: usize) -> Self {
        DataReader { limit, message: Vec::new(), too_large: false }
    }

    /// Feeds one line (with its line ending). Returns true at the end-of-data line.
    pub fn push_line(&mut self, line: &[u8]) -> bool {
        if line == b".\r\n" || line == b".\n" {
            return true;
        }
        let content = line.strip_prefix(b".").unwrap_or(line);
        if self.too_large || self.message.len() + content.len() > self.limit {
            self.too_large = true;
            return false;
        }
        self.message.extend_from_slice(content);
        false
    }

    /// Marks the message too large without storing the (over-long) line.
    pub fn overflow(&mut self) {
        self.too_large = true;
    }

    /// The message, or `None` if it was over the limit.
    pub fn finish(self) -> Option<Vec<u8>> {
        (!self.too_large).then_some(self.message)
    }
}

enum Line {
    Complete(Vec<u8>),
    /// Longer than allowed; the rest of it was read and discarded.
    TooLong,
    Closed,
}

async fn read_line(reader: &mut (impl AsyncBufRead + Unpin), max: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(if line.is_empty() && !too_long { Line::Closed } else { Line::Complete(line) });
        }
        let (chunk, found_end) = match available.iter().position(|byte| *byte == b'\n') {
            Some(end) => (&available[..=end], true),
            None => (available, false),
        };
        let chunk_length = chunk.len();
        if !too_long && line.len() + chunk_length <= max {
            line.extend_from_slice(chunk);
        } else {
            too_long = true;
            line.clear();
        }
        reader.consume(chunk_length);
        if found_end {
            return Ok(if too_long { Line::TooLong } else { Line::Complete(line) });
        }
    }
}

/// Accepts connections until `shutdown` resolves; each connection is its own task.
pub async fn serve(
    listener: TcpListener,
    settings: SmtpSettings,
    config: ConfigStore,
    intake: Intake,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    switchboard_runtime::tcp::configure_accepted_connection(&stream);
                    let session = Session { settings: settings.clone(), config: config.clone(), intake: intake.clone(), peer };
                    let span = tracing::info_span!("smtp_session", %peer);
                    tokio::spawn(async move {
                        if let Err(error) = session.run(stream).await {
                            tracing::debug!(%error, "smtp session ended with an i/o error");
                        }
                    }.instrument(span));
                }
                Err(error) => {
                    tracing::warn!(%error, "smtp accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

struct Session {
    settings: SmtpSettings,
    config: ConfigStore,
    intake: Intake,
    peer: SocketAddr,
}

/// Writes one reply line with a single write, so it leaves in one TCP segment (written as text
/// and CRLF, it went out as two packets, and without `TCP_NODELAY` the CRLF could wait for the
/// client's ACK of the text).
async fn reply(writer: &mut (impl AsyncWrite + Unpin), text: &str) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(text.len() + 2);
    line.extend_from_slice(text.as_bytes());
    line.extend_from_slice(b"\r\n");
    writer.write_all(&line).await?;
    writer.flush().await
}

impl Session {
    async fn run(self, stream: TcpStream) -> std::io::Result<()> {
        let (read_half, mut writer) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        let hostname = self.settings.hostname.clone();
        reply(&mut writer, &format!("220 {hostname} Switchboard ESMTP ready")).await?;
        let mut greeted = false;
        let mut reverse_path: Option<String> = None;
        let mut recipients: Vec<String> = Vec::new();
        loop {
            let line =
                match tokio::time::timeout(self.settings.command_timeout, read_line(&mut reader, MAX_COMMAND_LINE))
                    .await
                {
                    Err(_) => {
                        reply(&mut writer, "421 4.4.2 idle too long, closing connection").await?;
                        return Ok(());
                    }
                    Ok(line) => line?,
                };
            let line = match line {
                Line::Closed => return Ok(()),
                Line::TooLong => {
                    reply(&mut writer, "500 5.5.2 line too long").await?;
                    continue;
                }
                Line::Complete(line) => line,
            };
            let command = match parse_command(&line) {
                Ok(command) => command,
                Err(SyntaxError::UnknownCommand) => {
                    reply(&mut writer, "500 5.5.1 command not recognised").await?;
                    continue;
                }
                Err(SyntaxError::BadArguments(problem)) => {
                    reply(&mut writer, &format!("501 5.5.4 {problem}")).await?;
                    continue;
                }
            };
            match command {
                Command::Helo(client) => {
                    greeted = true;
                    reverse_path = None;
                    recipients.clear();
                    reply(&mut writer, &format!("250 {hostname} greets {client}")).await?;
                }
                Command::Ehlo(client) => {
                    greeted = true;
                    reverse_path = None;
                    recipients.clear();
                    let size = self.settings.max_message_bytes;
                    reply(
                        &mut writer,
                        &format!("250-{hostname} greets {client}\r\n250-SIZE {size}\r\n250-8BITMIME\r\n250-PIPELINING\r\n250 ENHANCEDSTATUSCODES"),
                    )
                    .await?;
                }
                Command::Mail { .. } | Command::Rcpt { .. } | Command::Data if !greeted => {
                    reply(&mut writer, "503 5.5.1 say EHLO or HELO first").await?;
                }
                Command::Mail { reverse_path: path, declared_size } => {
                    if reverse_path.is_some() {
                        reply(&mut writer, "503 5.5.1 nested MAIL command").await?;
                    } else if declared_size.is_some_and(|size| size > self.settings.max_message_bytes) {
                        reply(&mut writer, "552 5.3.4 message size exceeds fixed maximum message size").await?;
                    } else {
                        reverse_path = Some(path);
                        reply(&mut writer, "250 2.1.0 OK").await?;
                    }
                }
                Command::Rcpt { forward_path } => {
                    if reverse_path.is_none() {
                        reply(&mut writer, "503 5.5.1 need MAIL before RCPT").await?;
                    } else if recipients.len() >= self.settings.max_recipients {
                        reply(&mut writer, "452 4.5.3 too many recipients").await?;
                    } else if !email::is_team_address(&self.config.snapshot(), &forward_path) {
                        reply(&mut writer, "550 5.1.1 no team mailbox here by that name").await?;
                    } else {
                        recipients.push(forward_path);
                        reply(&mut writer, "250 2.1.5 OK").await?;
                    }
                }
                Command::Data => {
                    if reverse_path.is_none() || recipients.is_empty() {
                        reply(&mut writer, "503 5.5.1 need MAIL and RCPT before DATA").await?;
                        continue;
                    }
                    reply(&mut writer, "354 end data with <CR><LF>.<CR><LF>").await?;
                    let mut data = DataReader::new(self.settings.max_message_bytes);
                    loop {
                        let line = tokio::time::timeout(
                            self.settings.command_timeout,
                            read_line(&mut reader, self.settings.max_message_bytes.max(MAX_COMMAND_LINE)),
                        )
                        .await
                        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "data timeout"))??;
                        match line {
                            // The client went away mid-message: nothing was acknowledged.
                            Line::Closed => return Ok(()),
                            Line::TooLong => data.overflow(),
                            Line::Complete(line) => {
                                if data.push_line(&line) {
                                    break;
                                }
                            }
                        }
                    }
                    let answer = match data.finish() {
                        None => {
                            self.intake.metrics.received("team_email");
                            self.intake.metrics.rejected("team_email", "body_too_large");
                            "552 5.3.4 message size exceeds fixed maximum message size".to_owned()
                        }
                        Some(message) => self.deliver(&message, &recipients).await,
                    };
                    reverse_path = None;
                    recipients.clear();
                    reply(&mut writer, &answer).await?;
                }
                Command::Rset => {
                    reverse_path = None;
                    recipients.clear();
                    reply(&mut writer, "250 2.0.0 OK").await?;
                }
                Command::Noop => reply(&mut writer, "250 2.0.0 OK").await?,
                Command::Vrfy => {
                    reply(&mut writer, "252 2.5.0 cannot verify, but will accept mail for team addresses").await?
                }
                Command::Help => {
                    reply(&mut writer, "214 2.0.0 commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY QUIT").await?
                }
                Command::Quit => {
                    reply(&mut writer, &format!("221 2.0.0 {hostname} closing connection")).await?;
                    return Ok(());
                }
                Command::NotImplemented(verb) => {
                    reply(&mut writer, &format!("502 5.5.1 {verb} not implemented")).await?
                }
            }
        }
    }

    /// Parses and publishes one mail; the reply line for the end of DATA.
    async fn deliver(&self, message: &[u8], recipients: &[String]) -> String {
        self.intake.metrics.received("team_email");
        let result = async {
            let events = email::to_inbound_events(&self.config.snapshot(), message, recipients, Utc::now())?;
            self.intake.publish_all("team_email", events).await
        }
        .await;
        match result {
            Ok(published) => {
                let ids: Vec<&str> = published.iter().map(|outcome| outcome.id.as_str()).collect();
                tracing::info!(peer = %self.peer, message_ids = ?ids, "mail accepted");
                format!("250 2.0.0 OK queued as {}", ids.join(","))
            }
            Err(error) => {
                self.intake.metrics.rejected("team_email", error.code());
                match error {
                    IngestError::LogUnavailable(cause) => {
                        tracing::error!(error = format!("{cause:#}"), "publishing mail to kafka failed");
                        "451 4.3.0 temporary failure storing the message, try again later".to_owned()
                    }
                    IngestError::NoChannelFor { .. } => format!("550 5.1.1 {error}"),
                    other => {
                        tracing::info!(error = %other, "mail refused");
                        format!("554 5.6.0 {}", other.to_string().replace(['\r', '\n'], " "))
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn c1_smtp_commands_parse_case_insensitively_with_parameters() {
        assert_eq!(parse_command(b"EHLO relay.example.org\r\n"), Ok(Command::Ehlo("relay.example.org".into())));
        assert_eq!(
            parse_command(b"mail from:<a@b.c> SIZE=1024 BODY=8BITMIME\r\n"),
            Ok(Command::Mail { reverse_path: "a@b.c".into(), declared_size: Some(1024) })
        );
        assert_eq!(
            parse_command(b"MAIL FROM:<>\r\n"),
            Ok(Command::Mail { reverse_path: String::new(), declared_size: None })
        );
        assert_eq!(
            parse_command(b"RCPT TO: <Support@Example.com>\r\n"),
            Ok(Command::Rcpt { forward_path: "Support@Example.com".into() })
        );
        assert_eq!(
            parse_command(b"RCPT TO:<@relay:support@example.com>\r\n"),
            Ok(Command::Rcpt { forward_path: "support@example.com".into() })
        );
        assert_eq!(parse_command(b"DATA\r\n"), Ok(Command::Data));
        assert_eq!(parse_command(b"STARTTLS\r\n"), Ok(Command::NotImplemented("STARTTLS".into())));
        assert_eq!(parse_command(b"FOO\r\n"), Err(SyntaxError::UnknownCommand));
        assert!(matches!(parse_command(b"MAIL FROM:a@b.c\r\n"), Err(SyntaxError::BadArguments(_))));
        assert!(matches!(parse_command(b"RCPT TO:<>\r\n"), Err(SyntaxError::BadArguments(_))));
        assert!(matches!(parse_command(b"HELO\r\n"), Err(SyntaxError::BadArguments(_))));
        assert!(matches!(parse_command(b"MAIL FROM:<a@b.c> SIZE=big\r\n"), Err(SyntaxError::BadArguments(_))));
    }

    #[test]
    fn c1_data_is_dot_unstuffed_and_size_limited() {
        let mut data = DataReader::new(1_000);
        for line in [&b"Subject: x\r\n"[..], b"\r\n", b"..leading dot\r\n", b".\r\n"] {
            if data.push_line(line) {
                break;
            }
        }
        assert_eq!(data.finish().unwrap(), b"Subject: x\r\n\r\n.leading dot\r\n");
        let mut small = DataReader::new(10);
        assert!(!small.push_line(b"0123456789ABC\r\n"));
        assert!(!small.push_line(b"more\r\n"));
        assert!(small.push_line(b".\r\n"));
        assert!(small.finish().is_none());
    }
}
