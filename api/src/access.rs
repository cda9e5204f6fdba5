//! Inbox access rules (I2-I4) as pure functions of the caller and the inbox, so the whole
//! role × access mode × action matrix is unit-tested without I/O.

use crate::auth::{Identity, Role};
use crate::error::ApiError;

/// An inbox's access list, as the read model holds it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InboxAccess {
    pub inbox_id: String,
    pub account_id: String,
    /// 'everyone' or 'specific_users_and_teams' (I2).
    pub access_mode: String,
    pub access_user_ids: Vec<String>,
    pub access_team_ids: Vec<String>,
}

impl InboxAccess {
    fn open_to_everyone(&self) -> bool {
        // Anything but the restrictive mode is the I2 default.
        self.access_mode != "specific_users_and_teams"
    }

    /// Member of the access list (everyone is a member of an *everyone* inbox).
    pub fn has_member(&self, user_id: &str, team_ids: &[String]) -> bool {
        self.open_to_everyone()
            || self.access_user_ids.iter().any(|member| member == user_id)
            || team_ids.iter().any(|team| self.access_team_ids.contains(team))
    }
}

/// I2/I3: members see the inbox; admins and super admins see every inbox of their account.
pub fn can_see(identity: &Identity, inbox: &InboxAccess) -> bool {
    identity.account_id == inbox.account_id
        && (identity.role.is_admin() || inbox.has_member(&identity.user_id, &identity.team_ids))
}

/// I2/I3: only members act in an inbox, whatever their role.
pub fn can_act(identity: &Identity, inbox: &InboxAccess) -> bool {
    identity.account_id == inbox.account_id && inbox.has_member(&identity.user_id, &identity.team_ids)
}

/// Admins read every conversation of their account without consulting access lists (I3).
pub fn sees_whole_account(identity: &Identity) -> bool {
    identity.role.is_admin()
}

/// A command on something in `inbox`: NOT_FOUND when the caller cannot even see it (so
/// inbox contents are not disclosed), PERMISSION_DENIED when they see it but are not members.
pub fn check_act(identity: &Identity, inbox: &InboxAccess, what: &'static str, id: &str) -> Result<(), ApiError> {
    if !can_see(identity, inbox) {
        return Err(ApiError::not_found(what, id));
    }
    if !can_act(identity, inbox) {
        return Err(ApiError::denied(format!(
            "you can see inbox `{}` but are not on its access list, so you cannot act in it (I3)",
            inbox.inbox_id
        )));
    }
    Ok(())
}

/// Configuration commands need an admin role (on top of inbox membership where an inbox is
/// concerned).
pub fn check_admin(identity: &Identity) -> Result<(), ApiError> {
    if identity.role.is_admin() {
        Ok(())
    } else {
        Err(ApiError::denied("only admins and super admins may change configuration"))
    }
}

/// Granting admin powers is reserved to super admins.
pub fn check_may_grant_role(identity: &Identity, role: Role) -> Result<(), ApiError> {
    if role.is_admin() && identity.role != Role::SuperAdmin {
        return Err(ApiError::denied("only super admins may create admins and super admins"));
    }
    Ok(())
}

/// A manual action on a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConversationAction<'a> {
    Assign {
        assignee_id: &'a str,
    },
    Unassign,
    Close,
    /// Replying to the customer or adding an internal note (O2).
    Reply,
}

/// I4: users without a paid seat may take unassigned conversations (and then work on them),
/// but not reassign or close anybody else's. Inbox membership is checked separately.
pub fn check_seat_allows(
    identity: &Identity,
    caller_has_paid_seat: bool,
    current_assignee_opt: Option<&str>,
    action: ConversationAction<'_>,
) -> Result<(), ApiError> {
    if caller_has_paid_seat {
        return Ok(());
    }
    let own = current_assignee_opt == Some(identity.user_id.as_str());
    let allowed = match action {
        ConversationAction::Assign { assignee_id } => current_assignee_opt.is_none() && assignee_id == identity.user_id,
        ConversationAction::Unassign | ConversationAction::Close => own,
        // I4: unassigned conversations and one's own.
        ConversationAction::Reply => current_assignee_opt.is_none() || own,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::denied(
            "without a paid seat you may only take and reply to unassigned conversations and work on your own (I4)",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(user: &str, role: Role, teams: &[&str]) -> Identity {
        Identity {
            user_id: user.into(),
            account_id: "acme".into(),
            role,
            team_ids: teams.iter().map(|team| team.to_string()).collect(),
        }
    }

    fn everyone() -> InboxAccess {
        InboxAccess {
            inbox_id: "support".into(),
            account_id: "acme".into(),
            access_mode: "everyone".into(),
            access_user_ids: vec![],
            access_team_ids: vec![],
        }
    }

    fn restricted() -> InboxAccess {
        InboxAccess {
            inbox_id: "vip".into(),
            account_id: "acme".into(),
            access_mode: "specific_users_and_teams".into(),
            access_user_ids: vec!["member".into(), "admin-member".into()],
            access_team_ids: vec!["vip-team".into()],
        }
    }

    /// (caller, inbox, can see, can act) for every role × access mode × membership (I2, I3).
    #[test]
    fn i2_i3_visibility_and_action_matrix() {
        let cases = [
            (identity("someone", Role::Agent, &[]), everyone(), true, true),
            (identity("someone", Role::Admin, &[]), everyone(), true, true),
            (identity("someone", Role::SuperAdmin, &[]), everyone(), true, true),
            (identity("member", Role::Agent, &[]), restricted(), true, true),
            (identity("teammate", Role::Agent, &["vip-team"]), restricted(), true, true),
            (identity("outsider", Role::Agent, &["other"]), restricted(), false, false),
            (identity("outsider-admin", Role::Admin, &[]), restricted(), true, false),
            (identity("outsider-super", Role::SuperAdmin, &[]), restricted(), true, false),
            (identity("admin-member", Role::Admin, &[]), restricted(), true, true),
            (identity("team-admin", Role::SuperAdmin, &["vip-team"]), restricted(), true, true),
        ];
        for (caller, inbox, sees, acts) in cases {
            assert_eq!(can_see(&caller, &inbox), sees, "{caller:?} sees {}", inbox.inbox_id);
            assert_eq!(can_act(&caller, &inbox), acts, "{caller:?} acts in {}", inbox.inbox_id);
            let checked = check_act(&caller, &inbox, "inbox", &inbox.inbox_id);
            match (sees, acts) {
                (_, true) => assert!(checked.is_ok()),
                (true, false) => assert!(matches!(checked, Err(ApiError::PermissionDenied(_)))),
                (false, _) => assert!(matches!(checked, Err(ApiError::NotFound { .. }))),
            }
        }
    }

    #[test]
    fn i2_other_accounts_never_see_or_act_even_as_super_admin() {
        let foreign = Identity { account_id: "other".into(), ..identity("member", Role::SuperAdmin, &[]) };
        for inbox in [everyone(), restricted()] {
            assert!(!can_see(&foreign, &inbox));
            assert!(!can_act(&foreign, &inbox));
        }
    }

    #[test]
    fn i4_users_without_paid_seat_take_only_unassigned_conversations() {
        let free = identity("free", Role::Agent, &[]);
        let take = ConversationAction::Assign { assignee_id: "free" };
        let give_to_other = ConversationAction::Assign { assignee_id: "ana" };
        assert!(check_seat_allows(&free, false, None, take).is_ok());
        assert!(check_seat_allows(&free, false, Some("ana"), take).is_err(), "not someone else's");
        assert!(check_seat_allows(&free, false, None, give_to_other).is_err());
        assert!(check_seat_allows(&free, false, Some("free"), ConversationAction::Close).is_ok());
        assert!(check_seat_allows(&free, false, Some("free"), ConversationAction::Unassign).is_ok());
        assert!(check_seat_allows(&free, false, Some("ana"), ConversationAction::Close).is_err());
        assert!(check_seat_allows(&free, false, None, ConversationAction::Unassign).is_err());
        // O2: replies and notes as I4 says: unassigned conversations and one's own.
        assert!(check_seat_allows(&free, false, None, ConversationAction::Reply).is_ok());
        assert!(check_seat_allows(&free, false, Some("free"), ConversationAction::Reply).is_ok());
        assert!(check_seat_allows(&free, false, Some("ana"), ConversationAction::Reply).is_err());
        let paid = identity("paid", Role::Agent, &[]);
        for action in
            [take, give_to_other, ConversationAction::Unassign, ConversationAction::Close, ConversationAction::Reply]
        {
            assert!(check_seat_allows(&paid, true, Some("ana"), action).is_ok());
        }
    }

    #[test]
    fn configuration_is_for_admins_and_only_super_admins_grant_admin() {
        assert!(check_admin(&identity("a", Role::Agent, &[])).is_err());
        assert!(check_admin(&identity("a", Role::Admin, &[])).is_ok());
        assert!(check_may_grant_role(&identity("a", Role::Admin, &[]), Role::Agent).is_ok());
        assert!(check_may_grant_role(&identity("a", Role::Admin, &[]), Role::Admin).is_err());
        assert!(check_may_grant_role(&identity("a", Role::SuperAdmin, &[]), Role::SuperAdmin).is_ok());
    }
}
