//! The gRPC API against real PostgreSQL and Kafka: authentication, the I2-I4 access matrix,
//! queries (filters, paging, C7 hidden fields, B2 explanations), B6 positions, idempotent
//! validated commands, the watch stream and read-model schema switching (B4).

use std::time::Duration;

use switchboard_api::auth::Role;
use switchboard_proto::api::v1::*;
use switchboard_proto::events::v1::envelope::Payload;
use switchboard_proto::events::v1::{InboxAccessMode, InboxKind};
use switchboard_tests::TestEnv;
use switchboard_tests::api_seed::{self, ACME_CONFIG, Clients, Seeded, append_change, clients_for, identity};
use tokio_stream::StreamExt;
use tonic::Code;

struct Fixture {
    env: TestEnv,
    url: String,
    seeded: Seeded,
}

async fn fixture() -> anyhow::Result<Fixture> {
    let env = TestEnv::new().await?;
    env.apply_config(ACME_CONFIG).await?;
    let seeded = api_seed::seed(&env.pool).await?;
    let url = env
        .start_api_server_with_keys(Some(
            "[[keys]]\nkey = \"sk_test_integration_key_0001\"\nuser_id = \"crm-sync\"\naccount = \"acme\"\nrole = \"admin\"\n",
        ))
        .await?;
    Ok(Fixture { env, url, seeded })
}

async fn as_user(fixture: &Fixture, user: &str, role: Role, teams: &[&str]) -> anyhow::Result<Clients> {
    clients_for(&fixture.url, &identity(user, role, teams)).await
}

fn list_in(inbox_id: &str) -> ListConversationsRequest {
    ListConversationsRequest { inbox_id: inbox_id.into(), ..Default::default() }
}

fn code_of<T>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

async fn next(
    stream: &mut tonic::Streaming<ConversationChange>,
) -> Result<Option<Result<ConversationChange, tonic::Status>>, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(5), stream.next()).await
}

fn request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_authenticated_by_jwt_or_api_key() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let channel = switchboard_tests::connect_channel(&fixture.url).await?;
    let mut anonymous = conversation_service_client::ConversationServiceClient::new(channel.clone());
    let status = anonymous.list_conversations(list_in("support")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    for token in ["garbage", "a.b.c", "sk_test_unknown_key_000000"] {
        let mut client = conversation_service_client::ConversationServiceClient::with_interceptor(
            channel.clone(),
            switchboard_tests::BearerToken::new(token)?,
        );
        assert_eq!(code_of(client.list_conversations(list_in("support")).await), Code::Unauthenticated, "{token}");
    }
    let mut by_api_key = conversation_service_client::ConversationServiceClient::with_interceptor(
        channel.clone(),
        switchboard_tests::BearerToken::new("sk_test_integration_key_0001")?,
    );
    let listed = by_api_key.list_conversations(list_in("vip")).await?.into_inner();
    assert_eq!(listed.conversations.len(), 2, "the API key is an admin: it reads every inbox (I3)");
    // Health checking needs no token (load balancers).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await?;
    assert_eq!(serving.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    fixture.env.cleanup().await;
    Ok(())
}

/// I2, I3, I4: each role × access mode × call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn i2_i3_i4_access_matrix_role_by_access_mode_by_call() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let seeded = fixture.seeded.clone();
    // (user, role, teams, sees vip, acts in vip)
    let callers = [
        ("vip-agent", Role::Agent, vec![], true, true),
        ("teammate", Role::Agent, vec!["vip-team"], true, true),
        ("outsider", Role::Agent, vec![], false, false),
        ("admin-member", Role::Admin, vec![], true, true),
        ("admin-outsider", Role::Admin, vec![], true, false),
        ("super-outsider", Role::SuperAdmin, vec![], true, false),
    ];
    for (user, role, teams, sees_vip, acts_in_vip) in callers {
        let mut clients = as_user(&fixture, user, role, &teams).await?;
        let context = format!("{user} ({role:?})");
        // Everyone inbox: everyone reads and acts (I2 default).
        assert_eq!(code_of(clients.conversations.list_conversations(list_in("support")).await), Code::Ok, "{context}");
        let close_support = clients
            .admin
            .close_conversation(CloseConversationRequest {
                request_id: request_id(),
                conversation_id: seeded.support_assigned.to_string(),
            })
            .await;
        assert_eq!(code_of(close_support), Code::Ok, "{context} closes in support");
        // Restricted inbox: reads.
        let expected_read = if sees_vip { Code::Ok } else { Code::NotFound };
        assert_eq!(code_of(clients.conversations.list_conversations(list_in("vip")).await), expected_read, "{context}");
        let get = clients
            .conversations
            .get_conversation(GetConversationRequest {
                conversation_id: seeded.vip_assigned.to_string(),
                ..Default::default()
            })
            .await;
        assert_eq!(code_of(get), expected_read, "{context} get vip conversation");
        let watch = clients
            .conversations
            .watch_conversations(WatchConversationsRequest { inbox_ids: vec!["vip".into()], after_change_id: None })
            .await;
        assert_eq!(code_of(watch), expected_read, "{context} watch vip");
        let all = clients.conversations.list_conversations(ListConversationsRequest::default()).await?.into_inner();
        let vip_listed = all.conversations.iter().filter(|conversation| conversation.inbox_id == "vip").count();
        assert_eq!(vip_listed, if sees_vip { 2 } else { 0 }, "{context}: listing every inbox");
        let inboxes = clients.workspace.list_inboxes(ListInboxesRequest::default()).await?.into_inner().inboxes;
        let vip = inboxes.iter().find(|inbox| inbox.id == "vip");
        assert_eq!(vip.is_some(), sees_vip, "{context} ListInboxes");
        if let Some(vip) = vip {
            assert_eq!(vip.caller_can_act, acts_in_vip, "{context} caller_can_act");
        }
        // Restricted inbox: commands.
        let expected_act = match (sees_vip, acts_in_vip) {
            (_, true) => Code::Ok,
            (true, false) => Code::PermissionDenied,
            (false, _) => Code::NotFound,
        };
        let take = clients
            .admin
            .assign_conversation(AssignConversationRequest {
                request_id: request_id(),
                conversation_id: seeded.vip_unassigned.to_string(),
                assignee_agent_id: String::new(),
            })
            .await;
        assert_eq!(code_of(take), expected_act, "{context} takes a vip conversation");
        let close = clients
            .admin
            .close_conversation(CloseConversationRequest {
                request_id: request_id(),
                conversation_id: seeded.vip_assigned.to_string(),
            })
            .await;
        assert_eq!(code_of(close), expected_act, "{context} closes a vip conversation");
        let stage = clients
            .admin
            .move_ticket_stage(MoveTicketStageRequest {
                request_id: request_id(),
                ticket_id: seeded.vip_ticket.to_string(),
                stage: "solved".into(),
                close: false,
            })
            .await;
        assert_eq!(code_of(stage), expected_act, "{context} moves a vip ticket");
        if role.is_admin() {
            let rename = clients
                .admin
                .rename_inbox(RenameInboxRequest {
                    request_id: request_id(),
                    inbox_id: "vip".into(),
                    name: "VIP!".into(),
                })
                .await;
            assert_eq!(code_of(rename), expected_act, "{context} renames vip");
        }
    }
    // I4: a member without a paid seat takes unassigned conversations, nothing else.
    let mut free = as_user(&fixture, "free-member", Role::Agent, &[]).await?;
    let take_unassigned = free
        .admin
        .assign_conversation(AssignConversationRequest {
            request_id: request_id(),
            conversation_id: seeded.vip_unassigned.to_string(),
            assignee_agent_id: String::new(),
        })
        .await?;
    assert!(take_unassigned.into_inner().position.starts_with("inbound.v1:"));
    let take_assigned = free
        .admin
        .assign_conversation(AssignConversationRequest {
            request_id: request_id(),
            conversation_id: seeded.vip_assigned.to_string(),
            assignee_agent_id: String::new(),
        })
        .await;
    assert_eq!(code_of(take_assigned), Code::PermissionDenied, "I4: not someone else's conversation");
    let give_away = free
        .admin
        .assign_conversation(AssignConversationRequest {
            request_id: request_id(),
            conversation_id: seeded.support_unassigned.to_string(),
            assignee_agent_id: "ana".into(),
        })
        .await;
    assert_eq!(code_of(give_away), Code::PermissionDenied, "I4: only to themselves");
    // Agents never configure.
    let mut agent = as_user(&fixture, "ana", Role::Agent, &[]).await?;
    let create = agent
        .admin
        .create_inbox(CreateInboxRequest {
            request_id: request_id(),
            inbox_id: "sales".into(),
            name: "Sales".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(create), Code::PermissionDenied);
    // Another account's admin sees nothing of acme.
    let foreign =
        switchboard_api::auth::Identity { account_id: "other".into(), ..identity("x", Role::SuperAdmin, &[]) };
    let mut foreign = clients_for(&fixture.url, &foreign).await?;
    let none = foreign.conversations.list_conversations(ListConversationsRequest::default()).await?.into_inner();
    assert!(none.conversations.is_empty());
    let hidden = foreign
        .conversations
        .get_conversation(GetConversationRequest {
            conversation_id: seeded.support_assigned.to_string(),
            ..Default::default()
        })
        .await;
    assert_eq!(code_of(hidden), Code::NotFound);
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_filter_paginate_explain_and_keep_hidden_fields_off_the_inbox_view() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let seeded = fixture.seeded.clone();
    let mut clients = as_user(&fixture, "vip-agent", Role::Agent, &[]).await?;
    let conversations = &mut clients.conversations;

    // Filters.
    let unassigned = conversations
        .list_conversations(ListConversationsRequest { unassigned_only: true, ..Default::default() })
        .await?
        .into_inner();
    let mut ids: Vec<String> = unassigned.conversations.iter().map(|c| c.id.clone()).collect();
    ids.sort();
    let mut expected = vec![seeded.support_unassigned.to_string(), seeded.vip_unassigned.to_string()];
    expected.sort();
    assert_eq!(ids, expected);
    let by_assignee = conversations
        .list_conversations(ListConversationsRequest { assignee_id: "ana".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(by_assignee.conversations.len(), 1);
    let by_channel = conversations
        .list_conversations(ListConversationsRequest { channel_id: "vip-mail".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(by_channel.conversations.len(), 2);
    let by_contact = conversations
        .list_conversations(ListConversationsRequest {
            contact_id: seeded.contact_id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(by_contact.conversations.len(), 4);
    let future = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3600, nanos: 0 };
    let none_since = conversations
        .list_conversations(ListConversationsRequest { updated_since: Some(future), ..Default::default() })
        .await?
        .into_inner();
    assert!(none_since.conversations.is_empty());

    // Keyset pagination, newest first, in both orders.
    for order_by in [ConversationOrder::StartedAtDesc, ConversationOrder::UpdatedAtDesc] {
        let mut seen = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = conversations
                .list_conversations(ListConversationsRequest {
                    page_size: 1,
                    page_token: page_token.clone(),
                    order_by: order_by as i32,
                    ..Default::default()
                })
                .await?
                .into_inner();
            seen.extend(page.conversations.into_iter().map(|c| c.id));
            if page.next_page_token.is_empty() {
                break;
            }
            page_token = page.next_page_token;
        }
        let newest_first =
            [seeded.vip_assigned, seeded.vip_unassigned, seeded.support_assigned, seeded.support_unassigned]
                .map(|id| id.to_string());
        assert_eq!(seen, newest_first, "{order_by:?}");
    }

    // Field-level validation details (google.rpc.BadRequest).
    let invalid = conversations
        .list_conversations(ListConversationsRequest {
            assignee_id: "ana".into(),
            unassigned_only: true,
            contact_id: "nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    use tonic_types::StatusExt;
    let fields: Vec<String> = invalid
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert_eq!(fields, ["unassigned_only", "contact_id"]);

    // C7 and B2: the inbox view has no hidden fields; the assignment history explains.
    let detail = conversations
        .get_conversation(GetConversationRequest {
            conversation_id: seeded.support_unassigned.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let message = &detail.messages[0];
    assert_eq!(message.kind, "form_submission");
    assert!(message.hidden_fields.is_empty());
    assert!(!format!("{:?}", message.content).contains("spring-sale"));
    assert_eq!(detail.assignments[0].outcome, "no_eligible_agent");
    assert_eq!(detail.assignments[0].skipped[0].reason, "at_capacity");
    assert_eq!(detail.assignments[0].rule_version, 3);
    let single = conversations
        .get_message(GetMessageRequest { message_id: seeded.form_message_id.to_string(), ..Default::default() })
        .await?
        .into_inner();
    assert!(single.hidden_fields.is_empty());

    // C7: the contact timeline shows hidden fields.
    let workspace = &mut clients.workspace;
    let timeline = workspace
        .get_contact_timeline(GetContactTimelineRequest {
            contact_id: seeded.contact_id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(timeline.messages.len(), 4);
    let form = timeline.messages.iter().find(|m| m.id == seeded.form_message_id.to_string()).unwrap();
    assert_eq!(form.hidden_fields[0].value, "spring-sale");
    assert_eq!(timeline.contact.unwrap().identities[0].external_id, "visitor-1");
    assert_eq!(timeline.tickets.len(), 2);

    // I2 on the timeline: an outsider sees only the support half of it.
    let mut outsider = as_user(&fixture, "outsider", Role::Agent, &[]).await?;
    let partial = outsider
        .workspace
        .get_contact_timeline(GetContactTimelineRequest {
            contact_id: seeded.contact_id.to_string(),
            ..Default::default()
        })
        .await?
        .into_inner();
    assert_eq!(partial.messages.len(), 2);
    assert_eq!(partial.conversations.len(), 2);
    assert_eq!(partial.tickets.len(), 1);

    // Tickets by pipeline, stage and owner; agents with workload; routing audit.
    let waiting = workspace
        .list_tickets(ListTicketsRequest { pipeline: "support".into(), stage: "waiting".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(waiting.tickets.iter().map(|t| t.id.clone()).collect::<Vec<_>>(), [seeded.vip_ticket.to_string()]);
    let owned = workspace
        .list_tickets(ListTicketsRequest { owner_agent_id: "ana".into(), ..Default::default() })
        .await?
        .into_inner();
    assert_eq!(owned.tickets.len(), 1);
    let agents = workspace.list_agents(ListAgentsRequest::default()).await?.into_inner().agents;
    let ana = agents.iter().find(|agent| agent.id == "ana").unwrap();
    assert_eq!((ana.open_total, ana.capacity_per_channel_type["chat"], ana.available), (1, 3, true));
    let available = workspace.list_agents(ListAgentsRequest { available_only: true, ..Default::default() }).await?;
    assert!(available.into_inner().agents.iter().all(|agent| agent.available));
    let team = workspace.list_agents(ListAgentsRequest { team_id: "vip-team".into(), ..Default::default() }).await?;
    assert_eq!(team.into_inner().agents.len(), 1);
    let audit = workspace.list_routing_audit(ListRoutingAuditRequest::default()).await?.into_inner();
    assert_eq!(audit.entries.len(), 2, "the entry without an inbox is for admins only");
    let audit_outsider = outsider.workspace.list_routing_audit(ListRoutingAuditRequest::default()).await?.into_inner();
    assert_eq!(audit_outsider.entries.len(), 1);
    let mut admin = as_user(&fixture, "admin-outsider", Role::Admin, &[]).await?;
    let audit_admin = admin.workspace.list_routing_audit(ListRoutingAuditRequest::default()).await?.into_inner();
    assert_eq!(audit_admin.entries.len(), 3);
    let inbox = workspace.get_inbox(GetInboxRequest { inbox_id: "support".into(), ..Default::default() }).await?;
    assert_eq!(inbox.into_inner().channels[0].id, "web-chat");
    fixture.env.cleanup().await;
    Ok(())
}

/// B6: a query with min_position waits (within its deadline) for the read models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b6_queries_wait_for_min_position_within_their_deadline() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let mut clients = as_user(&fixture, "ana", Role::Agent, &[]).await?;
    let pool = fixture.env.pool.clone();
    sqlx::query("INSERT INTO projector_positions (projection, topic, partition, next_offset) VALUES ('sources', 'inbound.v1', 3, 5)")
        .execute(&pool)
        .await?;
    let reached = ListConversationsRequest { min_position: "inbound.v1:3:4".into(), ..list_in("support") };
    assert_eq!(code_of(clients.conversations.list_conversations(reached).await), Code::Ok);

    let mut ahead =
        tonic::Request::new(ListConversationsRequest { min_position: "inbound.v1:3:9".into(), ..list_in("support") });
    ahead.set_timeout(Duration::from_millis(400));
    let started = std::time::Instant::now();
    let status = clients.conversations.list_conversations(ahead).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("inbound.v1:3:9"), "{}", status.message());
    assert!(started.elapsed() < Duration::from_secs(2));

    let advance = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query("UPDATE projector_positions SET next_offset = 10 WHERE partition = 3").execute(&pool).await
    });
    let mut waits =
        tonic::Request::new(GetInboxRequest { inbox_id: "support".into(), min_position: "inbound.v1:3:9".into() });
    waits.set_timeout(Duration::from_secs(5));
    let started = std::time::Instant::now();
    clients.workspace.get_inbox(waits).await?;
    assert!(started.elapsed() >= Duration::from_millis(250), "it waited for the projector");
    advance.await??;

    let malformed = ListConversationsRequest { min_position: "sb.inbound.v1:3".into(), ..list_in("support") };
    assert_eq!(code_of(clients.conversations.list_conversations(malformed).await), Code::InvalidArgument);
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_validated_idempotent_and_published_with_positions() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let mut admin = as_user(&fixture, "admin-member", Role::Admin, &[]).await?;
    let create = CreateInboxRequest {
        request_id: "create-sales-1".into(),
        inbox_id: "sales".into(),
        name: "Sales".into(),
        kind: InboxKind::HelpDesk as i32,
        access_mode: InboxAccessMode::SpecificUsersAndTeams as i32,
        access_user_ids: vec!["admin-member".into()],
        access_team_ids: vec![],
        fallback_from_name: String::new(),
    };
    let first = admin.admin.create_inbox(create.clone()).await?.into_inner();
    assert!(first.position.starts_with("config.v1:"), "{}", first.position);
    assert!(!first.replayed);
    let retry = admin.admin.create_inbox(create.clone()).await?.into_inner();
    assert_eq!((retry.position.as_str(), retry.replayed), (first.position.as_str(), true), "same id, same answer");
    let reused =
        admin.admin.create_inbox(CreateInboxRequest { name: "Other".into(), ..create.clone() }).await.unwrap_err();
    assert_eq!(reused.code(), Code::InvalidArgument);
    let duplicate =
        admin.admin.create_inbox(CreateInboxRequest { request_id: "create-sales-2".into(), ..create.clone() }).await;
    assert_eq!(code_of(duplicate), Code::AlreadyExists);

    // Validation first, every bad field reported.
    let invalid = admin
        .admin
        .create_inbox(CreateInboxRequest {
            request_id: request_id(),
            inbox_id: "Not An Id".into(),
            name: " ".into(),
            kind: 99,
            ..Default::default()
        })
        .await
        .unwrap_err();
    use tonic_types::StatusExt;
    let fields: Vec<String> = invalid
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert_eq!(fields, ["inbox_id", "name", "kind"]);
    let missing_id = admin
        .admin
        .rename_inbox(RenameInboxRequest { inbox_id: "vip".into(), name: "x".into(), ..Default::default() })
        .await;
    assert_eq!(code_of(missing_id), Code::InvalidArgument);
    // R6: routing rules cannot name users without a paid seat.
    let rules = admin
        .admin
        .set_routing_rules(SetRoutingRulesRequest {
            request_id: request_id(),
            channel_id: "vip-mail".into(),
            auto_assign: true,
            target: switchboard_proto::events::v1::AssignTarget::SpecificUsersAndTeams as i32,
            user_ids: vec!["vip-agent".into(), "free-member".into(), "ghost".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    let fields: Vec<String> = rules
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|violation| violation.field)
        .collect();
    assert_eq!(fields, ["user_ids[1]", "user_ids[2]"]);
    // I3: no self lock-out.
    let lockout = admin
        .admin
        .set_inbox_access(SetInboxAccessRequest {
            request_id: request_id(),
            inbox_id: "vip".into(),
            access_mode: InboxAccessMode::SpecificUsersAndTeams as i32,
            access_user_ids: vec!["vip-agent".into()],
            access_team_ids: vec![],
        })
        .await;
    assert_eq!(code_of(lockout), Code::FailedPrecondition);

    // The commands that passed, as the log has them.
    let rename = admin
        .admin
        .rename_inbox(RenameInboxRequest {
            request_id: request_id(),
            inbox_id: "sales".into(),
            name: "Sales EMEA".into(),
        })
        .await?
        .into_inner();
    assert!(rename.position.starts_with("config.v1:"));
    let availability = admin
        .admin
        .set_agent_availability(SetAgentAvailabilityRequest {
            request_id: "avail-1".into(),
            agent_id: "ana".into(),
            available: false,
        })
        .await?
        .into_inner();
    let positions: Vec<&str> = availability.position.split(',').collect();
    assert!(positions[0].starts_with("inbound.v1:") && positions[1].starts_with("config.v1:"), "{positions:?}");
    let config_events = fixture.env.read_committed_events(&fixture.env.topics.config)?;
    let sales: Vec<_> = config_events
        .iter()
        .filter_map(|event| match &event.payload {
            Some(Payload::InboxConfigured(inbox)) if inbox.inbox_id == "sales" => Some(inbox.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(sales.len(), 2, "one create, one rename: retries published nothing");
    assert_eq!(sales[1].name, "Sales EMEA");
    assert_eq!(sales[1].kind, InboxKind::HelpDesk as i32, "rename keeps the rest of the entity");
    let ana = config_events.iter().rev().find_map(|event| match &event.payload {
        Some(Payload::AgentConfigured(agent)) if agent.agent_id == "ana" => Some(agent.clone()),
        _ => None,
    });
    assert!(!ana.unwrap().available);
    let inbound = fixture.env.read_committed_events(&fixture.env.topics.inbound)?;
    let change = inbound.iter().find_map(|event| match &event.payload {
        Some(Payload::AgentAvailabilityChanged(change)) => Some((event.partition_key.clone(), change.clone())),
        _ => None,
    });
    let (key, change) = change.expect("availability command on inbound.v1");
    assert_eq!((key.as_str(), change.request_id.as_str()), ("acme", "avail-1"));
    assert_eq!(change.actor.unwrap().user_id, "admin-member");
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_records_carry_the_trace_context_of_the_call_and_their_type() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let mut admin = as_user(&fixture, "admin-member", Role::Admin, &[]).await?;
    let availability = admin
        .admin
        .set_agent_availability(SetAgentAvailabilityRequest {
            request_id: request_id(),
            agent_id: "ana".into(),
            available: false,
        })
        .await?
        .into_inner();
    // One command record on inbound.v1 and one config record, at the positions returned.
    for position in availability.position.split(',') {
        let mut parts = position.split(':');
        let (base_topic, partition, offset) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
        let topic = match base_topic {
            "inbound.v1" => &fixture.env.topics.inbound,
            _ => &fixture.env.topics.config,
        };
        let records = fixture.env.read_committed_records(topic)?;
        let record = records
            .iter()
            .find(|record| record.partition.to_string() == partition && record.offset.to_string() == offset)
            .unwrap_or_else(|| panic!("a record at {position}"));
        let traceparent = record.headers.get("traceparent").unwrap_or_else(|| panic!("traceparent at {position}"));
        assert_eq!(switchboard_runtime::telemetry::trace_id_from_traceparent(traceparent).map(str::len), Some(32));
        let expected_type = if base_topic == "inbound.v1" { "agent_availability_changed" } else { "agent_configured" };
        assert_eq!(record.headers.get("sb-event-type").map(String::as_str), Some(expected_type));
    }
    fixture.env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_migrations_adopt_tables_made_by_hand_and_keep_apart_from_the_projectors() -> anyhow::Result<()> {
    let env = TestEnv::new().await?;
    // A database whose api tables were created by the hand-written DDL of earlier releases.
    sqlx::raw_sql(
        "CREATE SCHEMA IF NOT EXISTS api; \
         CREATE TABLE IF NOT EXISTS api.command_requests (account_id text NOT NULL, request_id text NOT NULL, \
           command text NOT NULL, request_digest text NOT NULL, position text, \
           claimed_at timestamptz NOT NULL DEFAULT now(), completed_at timestamptz, \
           PRIMARY KEY (account_id, request_id)); \
         CREATE TABLE IF NOT EXISTS api.config_versions (config_key text PRIMARY KEY, version bigint NOT NULL); \
         INSERT INTO api.config_versions VALUES ('tickets/acme/web', 7);",
    )
    .execute(&env.pool)
    .await?;
    let projector_migrations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations").fetch_one(&env.pool).await?;
    switchboard_api::migrate(&env.pool).await?;
    switchboard_api::migrate(&env.pool).await?;
    let api_migrations: i64 =
        sqlx::query_scalar("SELECT count(*) FROM api._sqlx_migrations").fetch_one(&env.pool).await?;
    assert!(api_migrations >= 1);
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM public._sqlx_migrations").fetch_one(&env.pool).await?;
    assert_eq!(after, projector_migrations, "the projector's migration record is untouched");
    let version: i64 =
        sqlx::query_scalar("SELECT version FROM api.config_versions WHERE config_key = 'tickets/acme/web'")
            .fetch_one(&env.pool)
            .await?;
    assert_eq!(version, 7, "existing rows are kept");
    // The projector's migrator still finds only its own migrations.
    switchboard_projector::migrate(&env.pool).await?;
    env.cleanup().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_visible_changes_resumes_and_ends_on_schema_switch() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    let seeded = fixture.seeded.clone();
    let pool = fixture.env.pool.clone();
    let mut outsider = as_user(&fixture, "outsider", Role::Agent, &[]).await?;
    let mut member = as_user(&fixture, "vip-agent", Role::Agent, &[]).await?;
    let mut outsider_stream =
        outsider.conversations.watch_conversations(WatchConversationsRequest::default()).await?.into_inner();
    let mut member_stream =
        member.conversations.watch_conversations(WatchConversationsRequest::default()).await?.into_inner();
    // Let both streams register before the changes are committed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let vip_change = append_change(&pool, "vip", seeded.vip_assigned, "message").await?;
    let support_change = append_change(&pool, "support", seeded.support_assigned, "assigned").await?;
    let first = next(&mut outsider_stream).await?.unwrap()?;
    assert_eq!(first.change_id, support_change as u64, "I2: the outsider never sees the vip change");
    assert_eq!(first.conversation.unwrap().assignee_id, "ana");
    let seen: Vec<u64> =
        vec![next(&mut member_stream).await?.unwrap()?.change_id, next(&mut member_stream).await?.unwrap()?.change_id];
    assert_eq!(seen, [vip_change as u64, support_change as u64]);

    // Resume after a disconnect from the last change id received.
    drop(member_stream);
    let missed = append_change(&pool, "vip", seeded.vip_unassigned, "assigned").await?;
    let mut resumed = member
        .conversations
        .watch_conversations(WatchConversationsRequest {
            inbox_ids: vec!["vip".into()],
            after_change_id: Some(support_change as u64),
        })
        .await?
        .into_inner();
    assert_eq!(next(&mut resumed).await?.unwrap()?.change_id, missed as u64);

    // B4: switching the read-model schema ends streams and moves reads to the new schema.
    sqlx::raw_sql(
        "CREATE SCHEMA rm_test;
         CREATE TABLE rm_test.conversations (LIKE public.conversations INCLUDING ALL);
         CREATE TABLE rm_test.inboxes (LIKE public.inboxes INCLUDING ALL);
         INSERT INTO rm_test.inboxes SELECT * FROM public.inboxes;
         INSERT INTO public.read_model_control (active_schema, previous_schema, switched_at)
             VALUES ('rm_test', 'public', now())
             ON CONFLICT (singleton) DO UPDATE SET active_schema = EXCLUDED.active_schema,
                 previous_schema = EXCLUDED.previous_schema, switched_at = EXCLUDED.switched_at;
         NOTIFY read_model_switch;",
    )
    .execute(&pool)
    .await?;
    let ended = next(&mut resumed).await?.unwrap().unwrap_err();
    assert_eq!(ended.code(), Code::Aborted);
    let after_switch = member.conversations.list_conversations(list_in("support")).await?.into_inner();
    assert!(after_switch.conversations.is_empty(), "reads follow the active schema (rm_test is empty)");
    fixture.env.cleanup().await;
    Ok(())
}

/// Browser clients speak gRPC-Web over HTTP/1.1 to the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_requests_over_http1_are_served() -> anyhow::Result<()> {
    let fixture = fixture().await?;
    switchboard_tests::connect_channel(&fixture.url).await?;
    let token = switchboard_api::auth::mint_token(
        switchboard_tests::TEST_JWT_SECRET.as_bytes(),
        &identity("outsider", Role::Agent, &[]),
        Duration::from_secs(60),
    )?;
    // One uncompressed frame holding an empty ListInboxesRequest.
    let frame = vec![0u8, 0, 0, 0, 0];
    let response = reqwest::Client::new()
        .post(format!("{}/switchboard.api.v1.WorkspaceService/ListInboxes", fixture.url))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .header("authorization", format!("Bearer {token}"))
        .body(frame)
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/grpc-web+proto");
    let body = response.bytes().await?;
    // Data frame (flag 0) with the response, then the trailers frame (flag 0x80) with grpc-status.
    assert_eq!(body[0], 0);
    let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let inboxes: ListInboxesResponse = prost::Message::decode(&body[5..5 + length])?;
    assert_eq!(inboxes.inboxes.iter().map(|inbox| inbox.id.as_str()).collect::<Vec<_>>(), ["support"]);
    let trailers = String::from_utf8_lossy(&body[5 + length + 5..]).to_lowercase();
    assert_eq!(body[5 + length], 0x80);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    fixture.env.cleanup().await;
    Ok(())
}
