//! Red team: two accounts on one installation (real Kafka, PostgreSQL, API and projector).
//! Account `globex` tries every AdminService command and query with `acme`'s ids and provider
//! identities, and apply-config across accounts. Expected: each attempt is refused with a clear
//! status or acts on globex's own entity of the same id, and nothing of acme's changes (M1, M2,
//! C1, R6).

use std::time::Duration;

use switchboard_api::auth::{Identity, Role};
use switchboard_ingest::secrets::Secrets;
use switchboard_ingest::signature::sign_hex;
use switchboard_proto::api::v1::channel_settings::Settings;
use switchboard_proto::api::v1::*;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{AssignTarget, ChannelType, EmailSettings, MessengerSettings, WhatsAppSettings};
use switchboard_tests::TestEnv;
use switchboard_tests::api_seed::{Clients, clients_for};
use tonic::Code;

const ACME: &str = "acme";
const GLOBEX: &str = "globex";

fn admin_of(account: &str) -> Identity {
    Identity { user_id: "root".into(), account_id: account.into(), role: Role::Admin, team_ids: vec![] }
}

fn request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn code_of<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

fn inbox(id: &str, name: &str) -> CreateInboxRequest {
    CreateInboxRequest { request_id: request_id(), inbox_id: id.into(), name: name.into(), ..Default::default() }
}

fn agent(id: &str, email: &str) -> CreateAgentRequest {
    CreateAgentRequest {
        request_id: request_id(),
        agent_id: id.into(),
        name: format!("{id} of {email}"),
        email: email.into(),
        paid_seat: true,
        available: true,
        ..Default::default()
    }
}

fn channel(id: &str, channel_type: ChannelType, settings_opt: Option<Settings>) -> ConnectChannelRequest {
    ConnectChannelRequest {
        request_id: request_id(),
        channel_id: id.into(),
        inbox_id: "support".into(),
        channel_type: channel_type as i32,
        name: id.into(),
        enabled: true,
        settings: settings_opt.map(|settings| ChannelSettings { settings: Some(settings) }),
    }
}

fn email(address: &str) -> Option<Settings> {
    Some(Settings::Email(EmailSettings { team_address: address.into(), ..Default::default() }))
}

fn page(page_id: &str) -> Option<Settings> {
    Some(Settings::Messenger(MessengerSettings { page_id: page_id.into(), ..Default::default() }))
}

fn number(phone_number_id: &str) -> Option<Settings> {
    Some(Settings::Whatsapp(WhatsAppSettings { phone_number_id: phone_number_id.into(), ..Default::default() }))
}

/// Acme's workspace: inbox `support`, agent `ana` (paid, named by the chat rules), team email,
/// Messenger, WhatsApp and chat channels.
async fn set_up_acme(acme: &mut Clients) -> anyhow::Result<String> {
    acme.admin.create_inbox(inbox("support", "Acme Support")).await?;
    acme.admin.create_agent(agent("ana", "ana@acme.test")).await?;
    acme.admin.connect_channel(channel("mail", ChannelType::TeamEmail, email("support@acme.test"))).await?;
    acme.admin.connect_channel(channel("fb", ChannelType::FacebookMessenger, page("1001"))).await?;
    acme.admin.connect_channel(channel("wa", ChannelType::Whatsapp, number("2002"))).await?;
    acme.admin.connect_channel(channel("web", ChannelType::Chat, None)).await?;
    let result = acme
        .admin
        .set_routing_rules(SetRoutingRulesRequest {
            request_id: request_id(),
            channel_id: "web".into(),
            auto_assign: true,
            target: AssignTarget::SpecificUsersAndTeams as i32,
            user_ids: vec!["ana".into()],
            ..Default::default()
        })
        .await?;
    Ok(result.into_inner().position)
}

async fn acme_inboxes(acme: &mut Clients, min_position: &str) -> anyhow::Result<Vec<(String, String)>> {
    let listed = acme
        .workspace
        .list_inboxes(ListInboxesRequest { min_position: min_position.into() })
        .await?
        .into_inner()
        .inboxes;
    Ok(listed.into_iter().map(|inbox| (inbox.id, inbox.name)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_admin_calls_with_another_accounts_ids_and_identities_change_nothing_of_it() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.start_projector().await?;
    let url = env.start_api_server().await?;
    let mut acme = clients_for(&url, &admin_of(ACME)).await?;
    let mut globex = clients_for(&url, &admin_of(GLOBEX)).await?;
    set_up_acme(&mut acme).await?;

    // M1: the same ids are globex's own entities, not "already exists".
    globex.admin.create_inbox(inbox("support", "Globex Help")).await?;
    globex.admin.create_agent(agent("ana", "ana@globex.test")).await?;
    // M2 / C1: acme's provider identities cannot be claimed, whatever the case or channel id.
    let claims = [
        ("team address", channel("mail", ChannelType::TeamEmail, email("SUPPORT@acme.test"))),
        ("team address", channel("mail-2", ChannelType::TeamEmail, email("support@acme.test"))),
        ("page", channel("fb-2", ChannelType::FacebookMessenger, page("1001"))),
        ("phone number", channel("wa-2", ChannelType::Whatsapp, number("2002"))),
        ("chat address", channel("web", ChannelType::Chat, None)),
        ("custom key", channel("web", ChannelType::Custom, None)),
    ];
    for (what, claim) in claims {
        let status = globex.admin.connect_channel(claim).await.unwrap_err();
        assert_eq!(status.code(), Code::AlreadyExists, "{what}: {status:?}");
        // The identity is named, the channel and account holding it never are.
        assert!(status.message().contains("M2") && !status.message().contains("`fb`"), "{what}: {}", status.message());
    }
    // C1: an agent's own address (any account's) is never a team address, nor the reverse.
    let status = globex
        .admin
        .connect_channel(channel("mail-3", ChannelType::TeamEmail, email("ana@acme.test")))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let status = globex.admin.create_agent(agent("bo", "Support@Acme.test")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Acme's ids that globex does not have are not found, never acted on.
    let update = UpdateChannelSettingsRequest {
        request_id: request_id(),
        channel_id: "fb".into(),
        name: "taken over".into(),
        ..Default::default()
    };
    assert_eq!(code_of(globex.admin.update_channel_settings(update).await), Code::NotFound);
    let disable = SetChannelEnabledRequest { request_id: request_id(), channel_id: "wa".into(), enabled: false };
    assert_eq!(code_of(globex.admin.set_channel_enabled(disable).await), Code::NotFound);
    let rules = SetRoutingRulesRequest { request_id: request_id(), channel_id: "web".into(), ..Default::default() };
    assert_eq!(code_of(globex.admin.set_routing_rules(rules).await), Code::NotFound);
    let tickets =
        SetTicketSettingsRequest { request_id: request_id(), channel_id: "mail".into(), ..Default::default() };
    assert_eq!(code_of(globex.admin.set_ticket_settings(tickets).await), Code::NotFound);
    // Commands on globex's own `support` and `ana` touch globex's only.
    globex
        .admin
        .rename_inbox(RenameInboxRequest {
            request_id: request_id(),
            inbox_id: "support".into(),
            name: "Renamed".into(),
        })
        .await?;
    // R6 scoped by account: globex's ana is named by no rule, so her seat may go; acme's ana
    // is named by acme's chat rules, so hers may not.
    globex
        .admin
        .set_agent_seat(SetAgentSeatRequest { request_id: request_id(), agent_id: "ana".into(), paid_seat: false })
        .await?;
    let status = acme
        .admin
        .set_agent_seat(SetAgentSeatRequest { request_id: request_id(), agent_id: "ana".into(), paid_seat: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("`web`") && status.message().contains("R6"), "{}", status.message());

    // Queries: acme sees its own inbox unchanged; globex's inbox reads under globex only.
    let position = acme
        .admin
        .rename_inbox(RenameInboxRequest {
            request_id: request_id(),
            inbox_id: "support".into(),
            name: "Acme Support".into(),
        })
        .await?
        .into_inner()
        .position;
    assert_eq!(acme_inboxes(&mut acme, &position).await?, [("support".to_owned(), "Acme Support".to_owned())]);
    let globex_inboxes = acme_inboxes(&mut globex, &position).await?;
    assert_eq!(globex_inboxes, [("support".to_owned(), "Renamed".to_owned())]);
    let agents = acme
        .workspace
        .list_agents(ListAgentsRequest { min_position: position.clone(), ..Default::default() })
        .await?
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert!(agents[0].paid_seat, "globex taking its own ana's seat did not touch acme's ana");
    let channels = acme
        .workspace
        .get_inbox(GetInboxRequest { inbox_id: "support".into(), min_position: position.clone() })
        .await?
        .into_inner()
        .channels;
    let mut channel_ids: Vec<String> = channels.iter().map(|channel| channel.id.clone()).collect();
    channel_ids.sort();
    assert_eq!(channel_ids, ["fb", "mail", "wa", "web"]);
    assert!(channels.iter().all(|channel| channel.enabled && channel.name != "taken over"));
    // Every inbox-scoped read answers another account's-only inbox ids alike: not found.
    let watch = WatchConversationsRequest { inbox_ids: vec!["vip".into()], ..Default::default() };
    assert_eq!(code_of(globex.conversations.watch_conversations(watch).await), Code::NotFound);
    let list = ListConversationsRequest { inbox_id: "vip".into(), ..Default::default() };
    assert_eq!(code_of(globex.conversations.list_conversations(list).await), Code::NotFound);
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_apply_config_keeps_accounts_apart_and_refuses_claimed_identities() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let file = |account: &str, team_address: &str| {
        format!(
            "account_id = \"{account}\"\n[[inboxes]]\nid = \"support\"\nname = \"{account} support\"\n\
             [[agents]]\nid = \"ana\"\nname = \"Ana\"\nemail = \"ana@{account}.test\"\npaid_seat = true\n\
             [[channels]]\nid = \"mail\"\ninbox = \"support\"\nname = \"Mail\"\ntype = \"team_email\"\n\
             [channels.email]\nteam_address = \"{team_address}\"\n"
        )
    };
    env.apply_config(&file(ACME, "support@acme.test")).await?;
    // The same ids for globex: its own entities; acme's stay acme's.
    env.apply_config(&file(GLOBEX, "support@globex.test")).await?;
    // Globex naming acme's team address: refused before anything is published.
    let error = env.apply_config(&file(GLOBEX, "Support@Acme.test")).await.unwrap_err();
    assert!(format!("{error:#}").contains("M2"), "{error:#}");

    let store = env.config_store("tenancy-check").await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let snapshot = loop {
        let snapshot = store.snapshot();
        if snapshot.inboxes.len() == 2 || tokio::time::Instant::now() > deadline {
            break snapshot;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(snapshot.inboxes.get(ACME, "support").map(|inbox| inbox.entity.name.as_str()), Some("acme support"));
    assert_eq!(snapshot.inboxes.get(GLOBEX, "support").map(|inbox| inbox.entity.name.as_str()), Some("globex support"));
    let address = |account: &str| {
        snapshot.channels.get(account, "mail").and_then(|channel| channel.entity.email.clone()).map(|e| e.team_address)
    };
    assert_eq!(address(ACME).as_deref(), Some("support@acme.test"));
    assert_eq!(address(GLOBEX).as_deref(), Some("support@globex.test"));
    env.cleanup().await;
    Ok(())
}

const MAIL_TO_ACME: &str = "From: Bob <bob@customer.test>\r\nTo: Support <SUPPORT@acme.test>\r\n\
Subject: Where is my order?\r\nMessage-ID: <order-1@customer.test>\r\nDate: Tue, 3 Mar 2026 10:00:00 +0100\r\n\
Content-Type: text/plain; charset=utf-8\r\n\r\nHello, where is my order?\r\n";

const MESSENGER_TO_ACME: &str = r#"{"object":"page","entry":[{"id":"1001","time":1772530000000,"messaging":[
  {"sender":{"id":"6543210987654321"},"recipient":{"id":"1001"},"timestamp":1772530000000,
   "message":{"mid":"m_tenancy_1","text":"Hello from Messenger"}}]}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_ingest_deliveries_to_contested_identities_reach_only_their_owner() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    let url = env.start_api_server().await?;
    let mut acme = clients_for(&url, &admin_of(ACME)).await?;
    let mut globex = clients_for(&url, &admin_of(GLOBEX)).await?;
    set_up_acme(&mut acme).await?;
    globex.admin.create_inbox(inbox("support", "Globex Help")).await?;
    // Globex tries to take acme's address and page, and connects its own channels of the same ids.
    let taken =
        globex.admin.connect_channel(channel("mail-2", ChannelType::TeamEmail, email("support@acme.test"))).await;
    assert_eq!(code_of(taken), Code::AlreadyExists);
    let taken = globex.admin.connect_channel(channel("fb-2", ChannelType::FacebookMessenger, page("1001"))).await;
    assert_eq!(code_of(taken), Code::AlreadyExists);
    globex.admin.connect_channel(channel("mail", ChannelType::TeamEmail, email("support@globex.test"))).await?;
    globex.admin.connect_channel(channel("fb", ChannelType::FacebookMessenger, page("3003"))).await?;

    // Each account's Messenger channel `fb` has its own app secret.
    let secrets = Secrets::parse(
        "[accounts.acme.channels.fb]\napp_secret = \"acme-app-secret\"\n\
         [accounts.globex.channels.fb]\napp_secret = \"globex-app-secret\"\n",
    )?;
    let bound = env.start_ingest_with(secrets, false).await?;
    let http = reqwest::Client::new();
    let mail = http
        .post(format!("http://{}/v1/email/inbound", bound.http))
        .header("content-type", "message/rfc822")
        .body(MAIL_TO_ACME)
        .send()
        .await?;
    assert_eq!(mail.status().as_u16(), 202, "{}", mail.text().await?);
    // Signed with globex's secret, acme's page's delivery is refused; with acme's, accepted.
    let messenger = |secret: &'static [u8]| {
        http.post(format!("http://{}/v1/webhooks/messenger", bound.http))
            .header("x-hub-signature-256", format!("sha256={}", sign_hex(secret, &[MESSENGER_TO_ACME.as_bytes()])))
            .body(MESSENGER_TO_ACME)
            .send()
    };
    assert_eq!(messenger(b"globex-app-secret").await?.status().as_u16(), 403);
    assert_eq!(messenger(b"acme-app-secret").await?.status().as_u16(), 200);

    let events = env.read_committed_events(&env.topics.inbound)?;
    let inbound: Vec<(&str, &str)> = events
        .iter()
        .filter_map(|event| match &event.payload {
            Some(Payload::InboundMessageReceived(message)) => {
                Some((event.account_id.as_str(), message.channel_id.as_str()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(inbound, [(ACME, "mail"), (ACME, "fb")], "delivered once, to acme only");
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_queries_and_commands_with_another_accounts_records_are_not_found() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    env.apply_config(switchboard_tests::api_seed::ACME_CONFIG).await?;
    let seeded = switchboard_tests::api_seed::seed(&env.pool).await?;
    let url = env.start_api_server().await?;
    let mut globex = clients_for(&url, &admin_of(GLOBEX)).await?;
    let not_found = |what: &str, code: Code| assert_eq!(code, Code::NotFound, "{what}");

    // Queries with acme's conversation, message, contact and inbox ids.
    let conversation_id = seeded.support_assigned.to_string();
    not_found(
        "GetConversation",
        code_of(
            globex
                .conversations
                .get_conversation(GetConversationRequest {
                    conversation_id: conversation_id.clone(),
                    ..Default::default()
                })
                .await,
        ),
    );
    let message = GetMessageRequest { message_id: seeded.form_message_id.to_string(), ..Default::default() };
    not_found("GetMessage", code_of(globex.conversations.get_message(message).await));
    let timeline = GetContactTimelineRequest { contact_id: seeded.contact_id.to_string(), ..Default::default() };
    not_found("GetContactTimeline", code_of(globex.workspace.get_contact_timeline(timeline).await));
    let get_inbox = GetInboxRequest { inbox_id: "vip".into(), ..Default::default() };
    not_found("GetInbox", code_of(globex.workspace.get_inbox(get_inbox).await));
    let list = ListConversationsRequest { inbox_id: "support".into(), ..Default::default() };
    not_found("ListConversations", code_of(globex.conversations.list_conversations(list).await));
    let watch = WatchConversationsRequest { inbox_ids: vec!["support".into()], ..Default::default() };
    not_found("WatchConversations", code_of(globex.conversations.watch_conversations(watch).await));
    // Account-wide lists hold nothing of acme's.
    let conversations =
        globex.conversations.list_conversations(ListConversationsRequest::default()).await?.into_inner().conversations;
    assert!(conversations.is_empty(), "{conversations:?}");
    assert!(globex.workspace.list_inboxes(ListInboxesRequest::default()).await?.into_inner().inboxes.is_empty());
    assert!(globex.workspace.list_agents(ListAgentsRequest::default()).await?.into_inner().agents.is_empty());
    assert!(globex.workspace.list_contacts(ListContactsRequest::default()).await?.into_inner().contacts.is_empty());
    assert!(globex.workspace.list_tickets(ListTicketsRequest::default()).await?.into_inner().tickets.is_empty());
    let audit = globex.workspace.list_routing_audit(ListRoutingAuditRequest::default()).await?.into_inner();
    assert!(audit.entries.is_empty(), "{:?}", audit.entries);

    // Commands on acme's conversation, ticket, contact, inbox and agents.
    let admin = &mut globex.admin;
    let assign = AssignConversationRequest {
        request_id: request_id(),
        conversation_id: conversation_id.clone(),
        assignee_agent_id: "root".into(),
    };
    not_found("AssignConversation", code_of(admin.assign_conversation(assign).await));
    let unassign = UnassignConversationRequest { request_id: request_id(), conversation_id: conversation_id.clone() };
    not_found("UnassignConversation", code_of(admin.unassign_conversation(unassign).await));
    let close = CloseConversationRequest { request_id: request_id(), conversation_id };
    not_found("CloseConversation", code_of(admin.close_conversation(close).await));
    let move_ticket = MoveTicketStageRequest {
        request_id: request_id(),
        ticket_id: seeded.support_ticket.to_string(),
        stage: "solved".into(),
        close: false,
    };
    not_found("MoveTicketStage", code_of(admin.move_ticket_stage(move_ticket).await));
    let owner = SetContactOwnerRequest {
        request_id: request_id(),
        contact_id: seeded.contact_id.to_string(),
        owner_agent_id: String::new(),
    };
    not_found("SetContactOwner", code_of(admin.set_contact_owner(owner).await));
    let access = SetInboxAccessRequest { request_id: request_id(), inbox_id: "vip".into(), ..Default::default() };
    not_found("SetInboxAccess", code_of(admin.set_inbox_access(access).await));
    let rename = RenameInboxRequest { request_id: request_id(), inbox_id: "vip".into(), name: "mine".into() };
    not_found("RenameInbox", code_of(admin.rename_inbox(rename).await));
    let skills = SetAgentSkillsRequest { request_id: request_id(), agent_id: "ana".into(), skills: vec![] };
    not_found("SetAgentSkills", code_of(admin.set_agent_skills(skills).await));
    let teams = SetAgentTeamsRequest { request_id: request_id(), agent_id: "ana".into(), team_ids: vec![] };
    not_found("SetAgentTeams", code_of(admin.set_agent_teams(teams).await));
    let capacity = SetAgentCapacityRequest { request_id: request_id(), agent_id: "ana".into(), ..Default::default() };
    not_found("SetAgentCapacity", code_of(admin.set_agent_capacity(capacity).await));
    let seat = SetAgentSeatRequest { request_id: request_id(), agent_id: "ana".into(), paid_seat: false };
    not_found("SetAgentSeat", code_of(admin.set_agent_seat(seat).await));
    let availability =
        SetAgentAvailabilityRequest { request_id: request_id(), agent_id: "ana".into(), available: false };
    not_found("SetAgentAvailability", code_of(admin.set_agent_availability(availability).await));

    // Nothing reached the log on globex's behalf.
    let inbound = env.read_committed_events(&env.topics.inbound)?;
    assert!(inbound.iter().all(|event| event.account_id != GLOBEX), "{inbound:?}");
    env.cleanup().await;
    Ok(())
}
