//! Consent on the client's side (SPEC.md 8.1 and 10.5): the user's invite settings on the
//! gateway, and invitations from users never talked with, held as requests until the user
//! accepts (join from the held Welcome) or declines (forget it, telling nobody).

use confab_spec::frame::{
    ClientFrame, ConversationKind, InvitePolicy, InviteSettings, ServerFrame, UpdateInviteSettings,
};
use confab_spec::ids::{ConversationId, Seq, StreamId, SystemKey};

use super::{Client, ClientError, member, rooms};
use crate::mls::EngineError;
use crate::store::{ConversationRecord, InvitationRequest};

impl Client {
    /// Changes who may claim this user's KeyPackages and add the user (SPEC.md 8.1): the
    /// policy when given, then `allow` added to and `disallow` taken off the allow list.
    /// All empty is a query. Returns the settings now in force.
    pub async fn update_invite_settings(
        &mut self,
        policy: Option<InvitePolicy>,
        allow: Vec<SystemKey>,
        disallow: Vec<SystemKey>,
    ) -> Result<InviteSettings, ClientError> {
        let some = |v: Vec<SystemKey>| (!v.is_empty()).then_some(v);
        let frame = UpdateInviteSettings {
            rid: 0,
            policy,
            allow: some(allow),
            disallow: some(disallow),
        };
        match self
            .request(|rid| ClientFrame::UpdateInviteSettings(UpdateInviteSettings { rid, ..frame }))
            .await?
        {
            ServerFrame::InviteSettings(settings) => Ok(settings),
            _ => Err(ClientError::Unexpected),
        }
    }

    /// The invitation requests held, oldest first.
    pub fn requests(&self) -> Result<Vec<InvitationRequest>, ClientError> {
        Ok(self.store.requests()?)
    }

    /// Accepts the invitation request of `conversation`: joins from its Welcome, drops the
    /// request, and follows the conversation from the Commit that added this device until
    /// it has caught up. A Welcome that no longer opens drops the request with
    /// [`ClientError::StaleRequest`]. A gateway that refuses the subscription (the user
    /// has joined `rooms_per_user_max` rooms, SPEC.md 10.4) is reported as
    /// [`ClientError::Refused`]; the conversation stays joined here and is followed again
    /// on the next connection (after leaving another room, it opens).
    pub async fn accept_request(
        &mut self,
        conversation: &ConversationId,
    ) -> Result<ConversationRecord, ClientError> {
        let request = self
            .store
            .requests()?
            .into_iter()
            .find(|r| r.conversation == *conversation)
            .ok_or(ClientError::NoSuchRequest)?;
        let joined = match self.engine.join(&request.welcome) {
            Ok(group) if group == *conversation => Ok(()),
            Ok(_) => Err("its Welcome is for another group".to_owned()),
            // A crash after the join and before the store recorded it: the group is there.
            Err(_) if member(&*self.engine, conversation, self.device)? => Ok(()),
            Err(e) => Err(super::unreadable_reason(&e)),
        };
        if let Err(reason) = joined {
            self.store.drop_request(conversation)?;
            return Err(ClientError::StaleRequest(reason));
        }
        let record = self.joined_record(conversation, request.inviter.system)?;
        let from_seq = Seq::new(request.commit_seq.get() + 1).unwrap_or(Seq::FIRST);
        self.store.join_requested(&record, from_seq)?;
        let stream = StreamId::Conversation(*conversation);
        self.subscribe(stream, Some(from_seq))?;
        self.sync().await?;
        if let Some(code) = self.refused_subscriptions.get(&stream) {
            return Err(ClientError::Refused(*code));
        }
        Ok(record)
    }

    /// Declines the invitation request of `conversation`: it is forgotten, and nothing is
    /// sent, so neither the inviter nor the gateway learns that it was seen. `false` if
    /// there was none.
    pub fn decline_request(&mut self, conversation: &ConversationId) -> Result<bool, ClientError> {
        Ok(self.store.drop_request(conversation)?)
    }

    /// Whether this device has talked with `user` (SPEC.md 10.5): its own user, a contact,
    /// the peer of a DM, or a member of a room it is in; or `conversation` is one it knows
    /// already (an invitation back into it).
    pub(super) fn knows(
        &self,
        user: &SystemKey,
        conversation: &ConversationId,
    ) -> Result<bool, ClientError> {
        if *user == self.device.system {
            return Ok(true);
        }
        if self.store.contacts()?.iter().any(|(_, k)| k == user) {
            return Ok(true);
        }
        for c in self.store.conversations()? {
            if c.id == *conversation {
                return Ok(true);
            }
            if c.removed {
                continue;
            }
            if c.peer == Some(*user) {
                return Ok(true);
            }
            if c.kind == ConversationKind::Room {
                match self.engine.members(&c.id) {
                    Ok(members) if members.iter().any(|(_, d)| d.system == *user) => {
                        return Ok(true);
                    }
                    Ok(_) | Err(EngineError::GroupNotFound | EngineError::Removed) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(false)
    }

    /// The record of a conversation just joined from a Welcome whose Commit `inviter`'s
    /// device made: a room when its group context carries roles (SPEC.md 10.1), else a DM
    /// with the other user.
    pub(super) fn joined_record(
        &self,
        conversation: &ConversationId,
        inviter: SystemKey,
    ) -> Result<ConversationRecord, ClientError> {
        let room = rooms::roles_in(&*self.engine, conversation)?.is_some();
        // In a DM the peer is the other user; the adder may be our own device.
        let own = self.device.system;
        let peer = self
            .engine
            .members(conversation)?
            .into_iter()
            .map(|(_, d)| d.system)
            .find(|s| *s != own)
            .or(Some(inviter).filter(|s| *s != own))
            .filter(|_| !room);
        Ok(ConversationRecord {
            id: *conversation,
            kind: if room {
                ConversationKind::Room
            } else {
                ConversationKind::DirectMessage
            },
            peer,
            removed: false,
        })
    }
}
