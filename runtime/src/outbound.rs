//! Outbound messages (O1-O6): the ids, keys and addresses that every service must compute the
//! same way. Pure functions; the API (agent replies), the router (automated messages) and the
//! delivery service all call these, so a reply's id, its partition and its email identity never
//! depend on who built it.

use switchboard_proto::events::v1::{ChannelConfigured, ChannelType, InboxConfigured};
use uuid::Uuid;

/// C6: the payloads of the consent prompt's quick replies (set by the router, recognised by
/// ingest's Messenger webhook as the customer's answer).
pub const CONSENT_GRANTED_PAYLOAD: &str = "SWITCHBOARD_CONSENT_GRANTED";
pub const CONSENT_DECLINED_PAYLOAD: &str = "SWITCHBOARD_CONSENT_DECLINED";

/// The mail domain of fallback addresses (C12) for inboxes whose config event predates
/// `InboxConfigured.fallback_address`. New inboxes get their address from the API's setting.
pub const DEFAULT_FALLBACK_DOMAIN: &str = "fallback.switchboard.invalid";

/// The id of an agent's reply or note: every retry of the same request (same account and
/// `request_id`) names the same reply, so the delivery service and the read models see one.
pub fn reply_id_for(account_id: &str, request_id: &str) -> Uuid {
    crate::ids::name_based_id("reply", &[account_id, request_id])
}

/// Partition key of `outbound.v1` and `delivery.v1`: a conversation's outbound messages and
/// their outcomes stay in order on one partition, and conversations spread over all of them.
/// Owner notifications (R4) are keyed by the conversation they are about.
pub fn outbound_partition_key(account_id: &str, conversation_id: &str) -> String {
    format!("{account_id}/{conversation_id}")
}

/// RFC 5322 Message-ID (without angle brackets) of an outbound email: stable for the reply, so
/// a second send after a crash carries the same one and the receiver can recognise it (O5).
pub fn email_message_id(reply_id: Uuid, from_address: &str) -> String {
    let domain = from_address.rsplit_once('@').map_or("switchboard.invalid", |(_, domain)| domain);
    format!("{}@{}", reply_id.simple(), domain.to_ascii_lowercase())
}

/// The inbox's fallback address and from-name (C12): as configured, or derived for inboxes
/// configured before the fallback fields existed.
pub fn fallback_identity(account_id: &str, inbox: &InboxConfigured) -> (String, String) {
    let address = if inbox.fallback_address.is_empty() {
        default_fallback_address(account_id, &inbox.inbox_id, DEFAULT_FALLBACK_DOMAIN)
    } else {
        inbox.fallback_address.clone()
    };
    let from_name =
        if inbox.fallback_from_name.is_empty() { inbox.name.clone() } else { inbox.fallback_from_name.clone() };
    (address, from_name)
}

/// `<inbox>.<account>@<domain>`, lower-case, with every character that is not a letter, digit,
/// `-` or `_` replaced by `-` (ids may contain characters a local part cannot).
pub fn default_fallback_address(account_id: &str, inbox_id: &str, domain: &str) -> String {
    let clean = |text: &str| -> String {
        text.chars()
            .map(|character| {
                if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
                    character.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect()
    };
    format!("{}.{}@{}", clean(inbox_id), clean(account_id), domain.to_ascii_lowercase())
}

// ---------------------------------------------------------------------------------------------
// Email identity, signature, bodies, subject and threading of an email reply (C1, C2, C12, R10).
// ---------------------------------------------------------------------------------------------

/// C2: the from-name mode when the channel names none.
pub const DEFAULT_FROM_NAME_MODE: &str = "agent_and_company";

/// Who an email reply is from (C2), and whether it goes out from the inbox's fallback address
/// (C12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailIdentity {
    pub from_name: String,
    pub from_address: String,
    pub from_fallback_address: bool,
}

/// Whether a team-email channel can send: it has a team address and it is not disconnected.
/// (Whether it is switched on, C11, is the caller's check: a channel that is off sends nothing.)
pub fn is_connected_team_email(channel: &ChannelConfigured) -> bool {
    channel.channel_type == ChannelType::TeamEmail as i32
        && channel.email.as_ref().is_some_and(|email| !email.team_address.trim().is_empty() && !email.disconnected)
}

/// The team address a form (C7) reply of the inbox goes out from: the inbox's switched-on,
/// connected team-email channel with the smallest channel id (deterministic when there are
/// several), or none (then the fallback address sends, C12).
pub fn inbox_team_email_channel<'a>(
    inbox_id: &str,
    channels: impl IntoIterator<Item = &'a ChannelConfigured>,
) -> Option<&'a ChannelConfigured> {
    channels
        .into_iter()
        .filter(|channel| channel.inbox_id == inbox_id && channel.enabled && is_connected_team_email(channel))
        .min_by(|left, right| left.channel_id.cmp(&right.channel_id))
}

/// C2: `company` → the company name alone; `agent_and_company` (and any other or no mode) →
/// "<agent name> at <company name>", or the company name alone when the agent has no name.
pub fn from_name_for(mode: &str, agent_name: &str, company_name: &str) -> String {
    let agent_name = agent_name.trim();
    if mode == "company" || agent_name.is_empty() {
        company_name.trim().to_owned()
    } else {
        format!("{agent_name} at {}", company_name.trim())
    }
}

/// The identity of an email reply of `agent_name`. `team_channel_opt` is the team-email channel
/// whose identity applies: the conversation's own channel for team email, the inbox's
/// [`inbox_team_email_channel`] for forms.
///
/// - Connected team address: from the channel's `from_address`, else its `team_address`; the
///   company name is the channel's name.
/// - Otherwise (no team channel, no team address, or `disconnected`): from the inbox's fallback
///   address ([`fallback_identity`]) with its fallback from-name as the company name (C12).
///
/// The channel's from-name mode applies either way (the default mode without a channel).
pub fn email_identity(
    account_id: &str,
    inbox: &InboxConfigured,
    team_channel_opt: Option<&ChannelConfigured>,
    agent_name: &str,
) -> EmailIdentity {
    let settings_opt = team_channel_opt.and_then(|channel| channel.email.as_ref());
    let mode = settings_opt
        .map(|email| email.from_name_mode.as_str())
        .filter(|mode| !mode.is_empty())
        .unwrap_or(DEFAULT_FROM_NAME_MODE);
    match team_channel_opt {
        Some(channel) if is_connected_team_email(channel) => {
            let email = channel.email.as_ref().expect("a connected team email channel has email settings");
            let from_address = if email.from_address.trim().is_empty() {
                email.team_address.trim()
            } else {
                email.from_address.trim()
            };
            EmailIdentity {
                from_name: from_name_for(mode, agent_name, &channel.name),
                from_address: from_address.to_ascii_lowercase(),
                from_fallback_address: false,
            }
        }
        _ => {
            let (address, fallback_from_name) = fallback_identity(account_id, inbox);
            EmailIdentity {
                from_name: from_name_for(mode, agent_name, &fallback_from_name),
                from_address: address,
                from_fallback_address: true,
            }
        }
    }
}

/// The agent's first name (the first word of the name) and last name (the rest).
pub fn name_parts(full_name: &str) -> (&str, &str) {
    let full_name = full_name.trim();
    match full_name.split_once(char::is_whitespace) {
        Some((first, rest)) => (first, rest.trim()),
        None => (full_name, ""),
    }
}

/// C2: the signature with `{{full_name}}`, `{{first_name}}` and `{{last_name}}` replaced by the
/// replying agent's name (HTML-escaped in an HTML signature). Other text is kept as written.
pub fn render_signature(template: &str, is_html: bool, agent_name: &str) -> String {
    let (first_name, last_name) = name_parts(agent_name);
    let value =
        |text: &str| -> String { if is_html { html_escape::encode_text(text).into_owned() } else { text.to_owned() } };
    template
        .replace("{{full_name}}", &value(agent_name.trim()))
        .replace("{{first_name}}", &value(first_name))
        .replace("{{last_name}}", &value(last_name))
}

/// Plain text of a (signature-sized) HTML fragment: tags dropped, line breaks for `<br>` and
/// block ends, entities decoded, `<script>`/`<style>` contents left out.
pub fn html_to_text(html: &str) -> String {
    const BLOCKS: [&str; 14] =
        ["p", "div", "li", "tr", "table", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"];
    let mut text = String::with_capacity(html.len());
    let mut rest = html;
    let mut skipping_until_opt: Option<&str> = None;
    while let Some(open) = rest.find('<') {
        if skipping_until_opt.is_none() {
            push_html_text(&mut text, &rest[..open]);
        }
        let Some(close) = rest[open..].find('>') else {
            rest = &rest[open..];
            break;
        };
        let tag = &rest[open + 1..open + close];
        rest = &rest[open + close + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|character| character.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(skipped) = skipping_until_opt {
            if closing && name == skipped {
                skipping_until_opt = None;
            }
            continue;
        }
        match name.as_str() {
            "script" if !closing => skipping_until_opt = Some("script"),
            "style" if !closing => skipping_until_opt = Some("style"),
            "br" => text.push('\n'),
            block if closing && BLOCKS.contains(&block) => text.push('\n'),
            _ => {}
        }
    }
    if skipping_until_opt.is_none() {
        push_html_text(&mut text, rest);
    }
    let decoded = html_escape::decode_html_entities(&text);
    let mut lines: Vec<&str> = decoded.lines().map(str::trim).collect();
    // At most one blank line in a row, none at either end.
    lines.dedup_by(|next, previous| next.is_empty() && previous.is_empty());
    lines.join("\n").trim_matches('\n').to_owned()
}

/// Text between tags: line breaks in HTML source are spaces.
fn push_html_text(text: &mut String, source: &str) {
    text.extend(source.chars().map(|character| if character == '\n' || character == '\r' { ' ' } else { character }));
}

/// Plain text as HTML: paragraphs at blank lines, `<br>` at single line breaks, escaped.
pub fn text_to_html(text: &str) -> String {
    let normalised = text.replace("\r\n", "\n");
    normalised
        .split("\n\n")
        .map(|paragraph| paragraph.trim_matches('\n'))
        .filter(|paragraph| !paragraph.trim().is_empty())
        .map(|paragraph| {
            let lines: Vec<String> =
                paragraph.lines().map(|line| html_escape::encode_text(line).into_owned()).collect();
            format!("<p>{}</p>", lines.join("<br>\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The two bodies of an email reply (sent as `multipart/alternative`), with the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmailBodies {
    pub text_body: String,
    pub html_body: String,
}

/// C2: `text` + "\n\n-- \n" + the plain signature (an HTML signature rendered to text), and
/// `html_opt` (or `text` as HTML paragraphs) + the HTML signature (a plain one as paragraphs)
/// in a `<div class="signature">`, placed before `</body>` when the HTML has one. No signature
/// configured: the bodies alone.
pub fn email_bodies(
    text: &str,
    html_opt: Option<&str>,
    signature_template: &str,
    signature_is_html: bool,
    agent_name: &str,
) -> EmailBodies {
    let html = match html_opt.filter(|html| !html.trim().is_empty()) {
        Some(html) => html.to_owned(),
        None => text_to_html(text),
    };
    if signature_template.trim().is_empty() {
        return EmailBodies { text_body: text.to_owned(), html_body: html };
    }
    let rendered = render_signature(signature_template, signature_is_html, agent_name);
    let (plain_signature, html_signature) = if signature_is_html {
        (html_to_text(&rendered), rendered)
    } else {
        let html_signature = text_to_html(&rendered);
        (rendered, html_signature)
    };
    let signature_block = format!("<div class=\"signature\">-- <br>\n{html_signature}</div>");
    let html_body = match html.to_ascii_lowercase().rfind("</body>") {
        Some(body_end) => format!("{}{signature_block}\n{}", &html[..body_end], &html[body_end..]),
        None => format!("{html}\n{signature_block}"),
    };
    EmailBodies { text_body: format!("{text}\n\n-- \n{plain_signature}"), html_body }
}

/// The subject of an email reply: the requested one, else "Re: " and the conversation's
/// subject, which keeps its own "Re:" (any case) rather than getting a second one. A
/// conversation without a subject gets "Re: your message".
pub fn reply_subject(requested: &str, conversation_subject: &str) -> String {
    if !requested.trim().is_empty() {
        return requested.trim().to_owned();
    }
    let subject = conversation_subject.trim();
    if subject.is_empty() {
        return "Re: your message".to_owned();
    }
    let has_re_prefix = subject.get(..2).is_some_and(|prefix| prefix.eq_ignore_ascii_case("re"))
        && subject[2..].trim_start().starts_with(':');
    if has_re_prefix { subject.to_owned() } else { format!("Re: {subject}") }
}

/// R10: `In-Reply-To` and `References` of a reply to the customer's latest email (its
/// Message-ID and its own References): the reply points at that message, and its References are
/// the customer's plus that Message-ID, without angle brackets or repeats. No inbound email (a
/// form, or mail not yet received): no threading headers.
pub fn threading_headers(latest_inbound_opt: Option<(&str, &[String])>) -> (String, Vec<String>) {
    let Some((message_id, references)) = latest_inbound_opt else {
        return (String::new(), Vec::new());
    };
    let clean = |id: &str| id.trim().trim_start_matches('<').trim_end_matches('>').to_owned();
    let in_reply_to = clean(message_id);
    let mut chain: Vec<String> = Vec::with_capacity(references.len() + 1);
    for reference in references.iter().map(|reference| clean(reference)).chain([in_reply_to.clone()]) {
        if !reference.is_empty() && !chain.contains(&reference) {
            chain.push(reference);
        }
    }
    (in_reply_to, chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_ids_are_stable_per_account_and_request() {
        assert_eq!(reply_id_for("acme", "r-1"), reply_id_for("acme", "r-1"));
        assert_ne!(reply_id_for("acme", "r-1"), reply_id_for("globex", "r-1"));
        assert_ne!(reply_id_for("acme", "r-1"), reply_id_for("acme", "r-2"));
    }

    #[test]
    fn email_message_ids_use_the_sender_domain() {
        let reply_id = Uuid::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
        assert_eq!(email_message_id(reply_id, "Help@Acme.Example"), "0123456789abcdef0123456789abcdef@acme.example");
    }

    #[test]
    fn c12_fallback_identity_is_configured_or_derived() {
        let legacy = InboxConfigured { inbox_id: "Support EU".into(), name: "Support".into(), ..Default::default() };
        assert_eq!(
            fallback_identity("acme", &legacy),
            ("support-eu.acme@fallback.switchboard.invalid".to_owned(), "Support".to_owned())
        );
        let configured = InboxConfigured {
            fallback_address: "support.acme@replies.example".into(),
            fallback_from_name: "Acme Support".into(),
            ..legacy
        };
        assert_eq!(
            fallback_identity("acme", &configured),
            ("support.acme@replies.example".to_owned(), "Acme Support".to_owned())
        );
    }

    fn inbox() -> InboxConfigured {
        InboxConfigured {
            inbox_id: "support".into(),
            name: "Support".into(),
            fallback_address: "support.acme@replies.example".into(),
            fallback_from_name: "Acme Support".into(),
            ..Default::default()
        }
    }

    fn team_email(channel_id: &str, mode: &str, from_address: &str, disconnected: bool) -> ChannelConfigured {
        ChannelConfigured {
            channel_id: channel_id.into(),
            inbox_id: "support".into(),
            channel_type: ChannelType::TeamEmail as i32,
            name: "Acme Help".into(),
            enabled: true,
            email: Some(switchboard_proto::events::v1::EmailSettings {
                team_address: "help@acme.example".into(),
                from_name_mode: mode.into(),
                from_address: from_address.into(),
                disconnected,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn c2_from_name_follows_the_channel_mode() {
        assert_eq!(from_name_for("agent_and_company", "Ana Alvarez", "Acme Help"), "Ana Alvarez at Acme Help");
        assert_eq!(from_name_for("", "Ana", "Acme Help"), "Ana at Acme Help", "agent and company is the default");
        assert_eq!(from_name_for("company", "Ana Alvarez", "Acme Help"), "Acme Help");
        assert_eq!(from_name_for("agent_and_company", "  ", "Acme Help"), "Acme Help", "no agent name");
    }

    #[test]
    fn c2_from_address_is_the_channels_from_address_else_its_team_address() {
        let with_from = team_email("mail", "agent_and_company", "Replies@Acme.Example", false);
        assert_eq!(
            email_identity("acme", &inbox(), Some(&with_from), "Ana"),
            EmailIdentity {
                from_name: "Ana at Acme Help".into(),
                from_address: "replies@acme.example".into(),
                from_fallback_address: false
            }
        );
        let without_from = team_email("mail", "company", "", false);
        assert_eq!(
            email_identity("acme", &inbox(), Some(&without_from), "Ana"),
            EmailIdentity {
                from_name: "Acme Help".into(),
                from_address: "help@acme.example".into(),
                from_fallback_address: false
            }
        );
    }

    #[test]
    fn c12_fallback_address_sends_when_no_team_address_is_connected() {
        let disconnected = team_email("mail", "company", "replies@acme.example", true);
        assert_eq!(
            email_identity("acme", &inbox(), Some(&disconnected), "Ana"),
            EmailIdentity {
                from_name: "Acme Support".into(),
                from_address: "support.acme@replies.example".into(),
                from_fallback_address: true
            },
            "disconnected: the fallback address, with the channel's mode"
        );
        assert_eq!(
            email_identity("acme", &inbox(), None, "Ana Alvarez"),
            EmailIdentity {
                from_name: "Ana Alvarez at Acme Support".into(),
                from_address: "support.acme@replies.example".into(),
                from_fallback_address: true
            },
            "no team channel (forms): the default mode"
        );
        let mut no_address = team_email("mail", "agent_and_company", "", false);
        no_address.email.as_mut().unwrap().team_address = String::new();
        assert!(email_identity("acme", &inbox(), Some(&no_address), "Ana").from_fallback_address);
        let legacy = InboxConfigured { inbox_id: "support".into(), name: "Support".into(), ..Default::default() };
        let identity = email_identity("acme", &legacy, None, "");
        assert_eq!(identity.from_address, "support.acme@fallback.switchboard.invalid");
        assert_eq!(identity.from_name, "Support");
    }

    #[test]
    fn c12_forms_reply_from_the_inboxs_connected_team_address() {
        let off = ChannelConfigured { enabled: false, ..team_email("a-off", "company", "", false) };
        let disconnected = team_email("b-gone", "company", "", true);
        let connected = team_email("c-mail", "company", "", false);
        let later = team_email("d-mail", "company", "", false);
        let elsewhere = ChannelConfigured { inbox_id: "sales".into(), ..team_email("0-sales", "company", "", false) };
        let chat = ChannelConfigured {
            channel_id: "0-chat".into(),
            inbox_id: "support".into(),
            channel_type: ChannelType::Chat as i32,
            enabled: true,
            ..Default::default()
        };
        let channels = [&off, &disconnected, &later, &connected, &elsewhere, &chat];
        let chosen = inbox_team_email_channel("support", channels);
        assert_eq!(chosen.map(|channel| channel.channel_id.as_str()), Some("c-mail"));
        assert_eq!(inbox_team_email_channel("support", [&off, &disconnected, &chat]), None);
    }

    #[test]
    fn c2_signature_tokens_take_the_agents_names() {
        let template = "{{full_name}} / {{first_name}} / {{last_name}} / {{unknown}}";
        assert_eq!(
            render_signature(template, false, "Ana María Alvarez"),
            "Ana María Alvarez / Ana / María Alvarez / {{unknown}}"
        );
        assert_eq!(render_signature(template, false, " Cher "), "Cher / Cher /  / {{unknown}}");
        assert_eq!(
            render_signature("<b>{{full_name}}</b>", true, "Bo <Boss> & Co"),
            "<b>Bo &lt;Boss&gt; &amp; Co</b>",
            "names are escaped in HTML signatures"
        );
        assert_eq!(render_signature("{{full_name}}", false, "Bo <Boss>"), "Bo <Boss>", "plain stays plain");
    }

    #[test]
    fn c2_html_signatures_render_to_text() {
        assert_eq!(
            html_to_text(
                "<p>Ana Alvarez<br/>Acme &amp; Co</p>\n<div>Support</div><style>p{}</style><script>x</script>"
            ),
            "Ana Alvarez\nAcme & Co\nSupport"
        );
        assert_eq!(html_to_text("plain"), "plain");
        assert_eq!(html_to_text("<p>a</p>\n\n\n<p>b</p>"), "a\nb");
        assert_eq!(html_to_text("a<br><br><br>b"), "a\n\nb", "at most one blank line");
    }

    #[test]
    fn c2_bodies_carry_the_signature_in_both_parts() {
        let plain = email_bodies("Hello\n\nSecond <para>", None, "{{first_name}}\nAcme", false, "Ana Alvarez");
        assert_eq!(plain.text_body, "Hello\n\nSecond <para>\n\n-- \nAna\nAcme");
        assert_eq!(
            plain.html_body,
            "<p>Hello</p>\n<p>Second &lt;para&gt;</p>\n<div class=\"signature\">-- <br>\n<p>Ana<br>\nAcme</p></div>"
        );
        let html = email_bodies(
            "Hi",
            Some("<html><body><p>Hi</p></body></html>"),
            "<b>{{full_name}}</b>",
            true,
            "Ana Alvarez",
        );
        assert_eq!(html.text_body, "Hi\n\n-- \nAna Alvarez");
        assert_eq!(
            html.html_body,
            "<html><body><p>Hi</p><div class=\"signature\">-- <br>\n<b>Ana Alvarez</b></div>\n</body></html>"
        );
        let unsigned = email_bodies("Hi", None, "  ", false, "Ana");
        assert_eq!(unsigned, EmailBodies { text_body: "Hi".into(), html_body: "<p>Hi</p>".into() });
    }

    #[test]
    fn o4_reply_subjects_get_one_re_prefix() {
        assert_eq!(reply_subject("", "Refund"), "Re: Refund");
        assert_eq!(reply_subject("", "Re: Refund"), "Re: Refund");
        assert_eq!(reply_subject("", "RE:Refund"), "RE:Refund");
        assert_eq!(reply_subject("", "re : Refund"), "re : Refund");
        assert_eq!(reply_subject("", "Regarding refund"), "Re: Regarding refund");
        assert_eq!(reply_subject("", "  "), "Re: your message");
        assert_eq!(reply_subject(" New topic ", "Refund"), "New topic");
        assert_eq!(reply_subject("", "Ré"), "Re: Ré", "non-ASCII subjects are not cut mid-character");
    }

    #[test]
    fn r10_replies_thread_to_the_customers_latest_email() {
        assert_eq!(threading_headers(None), (String::new(), Vec::<String>::new()));
        let references = vec!["<a@x>".to_owned(), "b@x".to_owned(), "a@x".to_owned()];
        assert_eq!(
            threading_headers(Some(("<c@x>", &references))),
            ("c@x".to_owned(), vec!["a@x".to_owned(), "b@x".to_owned(), "c@x".to_owned()])
        );
        assert_eq!(threading_headers(Some(("c@x", &[]))), ("c@x".to_owned(), vec!["c@x".to_owned()]));
    }
}
