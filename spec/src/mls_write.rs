//! Writers of MLS messages (RFC 9420), for the peers that must produce bytes no MLS library
//! will: the conformance suite's hostile member (an unsigned Commit, a Remove without a
//! path, an Add of a forged KeyPackage, each correctly signed where it should be), the
//! gateway's tests, the load generator and the fuzzers. They write what RFC 9420 section 6
//! lays out and sign what section 6.1 says; none of them encrypts anything.
//!
//! ```text
//! PublicMessage   = version(u16) wire_format(u16)=1 FramedContent auth membership_tag?
//! FramedContent   = group_id<V> epoch(u64) sender authenticated_data<V> content_type(u8) body
//! auth            = signature<V> confirmation_tag<V>?   (the tag for Commits only)
//! FramedContentTBS = version(u16) wire_format(u16) FramedContent GroupContext (member senders)
//! ```

use crate::identity::DeviceKeyPair;
use crate::mls_framing::{MLS_VERSION_1_0, PeekError, push_vector};

/// The sizes of the tags a PublicMessage carries in ciphersuite 0x0001 (HMAC-SHA256).
pub const TAG_BYTES: usize = 32;

/// One proposal, as a Commit carries it by value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteProposal {
    /// Add the owner of this KeyPackage (its bytes without the MLSMessage header).
    Add(Vec<u8>),
    /// Remove the member at this leaf.
    Remove(u32),
    /// Replace the group context extensions with these `(type, data)` pairs.
    GroupContextExtensions(Vec<(u16, Vec<u8>)>),
}

/// The body of a Commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteCommit {
    /// Its proposals, all by value.
    pub proposals: Vec<WriteProposal>,
    /// The encoded `UpdatePath`, if any (taken from a real Commit: see
    /// [`crate::mls_framing::public_message_parts`]).
    pub path: Option<Vec<u8>>,
}

/// `FramedContent` of a Commit sent by the member at `leaf` (RFC 9420 section 6).
pub fn commit_content(group_id: &[u8], epoch: u64, leaf: u32, commit: &WriteCommit) -> Vec<u8> {
    let mut proposals = Vec::new();
    for p in &commit.proposals {
        proposals.push(1); // ProposalOrRef: proposal
        write_proposal(&mut proposals, p);
    }
    let mut body = Vec::new();
    push_vector(&mut body, &proposals);
    match &commit.path {
        Some(path) => {
            body.push(1);
            body.extend_from_slice(path);
        }
        None => body.push(0),
    }
    framed_content(group_id, epoch, leaf, 3, &body)
}

/// `FramedContent` of a standalone proposal sent by the member at `leaf`.
pub fn proposal_content(
    group_id: &[u8],
    epoch: u64,
    leaf: u32,
    proposal: &WriteProposal,
) -> Vec<u8> {
    let mut body = Vec::new();
    write_proposal(&mut body, proposal);
    framed_content(group_id, epoch, leaf, 2, &body)
}

/// A PublicMessage MLSMessage of `content` (a `FramedContent` of a member sender) with
/// `signature`; a Commit also gets a confirmation tag. Both tags are stand-ins of the right
/// size: only members, who hold the epoch's secrets, can check them.
pub fn public_message(content: &[u8], signature: &[u8], commit: bool) -> Vec<u8> {
    let mut m = Vec::with_capacity(content.len() + signature.len() + 80);
    m.extend_from_slice(&MLS_VERSION_1_0.to_be_bytes());
    m.extend_from_slice(&1u16.to_be_bytes());
    m.extend_from_slice(content);
    push_vector(&mut m, signature);
    if commit {
        push_vector(&mut m, &[0xC7; TAG_BYTES]);
    }
    push_vector(&mut m, &[0x3A; TAG_BYTES]);
    m
}

/// Signs `content` (a member's `FramedContent`) for the PublicMessage wire format in the
/// epoch whose `GroupContext` is `group_context`: `SignWithLabel(key, "FramedContentTBS",
/// FramedContentTBS)` (RFC 9420 sections 5.1.2 and 6.1).
pub fn sign_content(key: &DeviceKeyPair, content: &[u8], group_context: &[u8]) -> Vec<u8> {
    let mut tbs = Vec::with_capacity(4 + content.len() + group_context.len());
    tbs.extend_from_slice(&MLS_VERSION_1_0.to_be_bytes());
    tbs.extend_from_slice(&1u16.to_be_bytes());
    tbs.extend_from_slice(content);
    tbs.extend_from_slice(group_context);
    sign_with_label(key, "FramedContentTBS", &tbs)
}

/// `SignWithLabel` (RFC 9420 section 5.1.2) with a device key: Ed25519 over
/// `SignContent { "MLS 1.0 " + label, content }`.
pub fn sign_with_label(key: &DeviceKeyPair, label: &str, content: &[u8]) -> Vec<u8> {
    use ed25519_dalek::Signer as _;
    let mut sign_content = Vec::with_capacity(content.len() + label.len() + 16);
    push_vector(&mut sign_content, format!("MLS 1.0 {label}").as_bytes());
    push_vector(&mut sign_content, content);
    let signer = ed25519_dalek::SigningKey::from_bytes(&key.seed());
    signer.sign(&sign_content).to_bytes().to_vec()
}

/// A PrivateMessage MLSMessage header of `group` at `epoch` with content type application,
/// followed by `ciphertext` as if it were the encrypted part (nobody can decrypt it).
pub fn private_message(group_id: &[u8], epoch: u64, ciphertext: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(ciphertext.len() + group_id.len() + 24);
    m.extend_from_slice(&MLS_VERSION_1_0.to_be_bytes());
    m.extend_from_slice(&2u16.to_be_bytes());
    push_vector(&mut m, group_id);
    m.extend_from_slice(&epoch.to_be_bytes());
    m.push(1); // application
    push_vector(&mut m, &[]); // authenticated_data
    push_vector(&mut m, &[0x5E; 4]); // encrypted_sender_data
    push_vector(&mut m, ciphertext);
    m
}

/// The GroupInfo MLSMessage of `parts`, signed anew by `key` (`SignWithLabel(key,
/// "GroupInfoTBS", GroupInfoTBS)`, RFC 9420 section 12.4.3): a changed GroupInfo its
/// signer would have made.
pub fn group_info(parts: &crate::mls_framing::GroupInfoParts, key: &DeviceKeyPair) -> Vec<u8> {
    let mut parts = parts.clone();
    parts.signature = sign_with_label(key, "GroupInfoTBS", &parts.to_be_signed());
    parts.to_message()
}

/// The `GroupContext` inside an MLSMessage carrying a GroupInfo (RFC 9420 section 12.4.3):
/// the context of the epoch the GroupInfo was exported in.
pub fn group_context_of(group_info: &[u8]) -> Result<Vec<u8>, PeekError> {
    crate::mls_framing::group_info_context(group_info).map(<[u8]>::to_vec)
}

fn framed_content(
    group_id: &[u8],
    epoch: u64,
    leaf: u32,
    content_type: u8,
    body: &[u8],
) -> Vec<u8> {
    let mut c = Vec::with_capacity(body.len() + group_id.len() + 24);
    push_vector(&mut c, group_id);
    c.extend_from_slice(&epoch.to_be_bytes());
    c.push(1); // sender type: member
    c.extend_from_slice(&leaf.to_be_bytes());
    push_vector(&mut c, &[]); // authenticated_data
    c.push(content_type);
    c.extend_from_slice(body);
    c
}

fn write_proposal(out: &mut Vec<u8>, proposal: &WriteProposal) {
    match proposal {
        WriteProposal::Add(key_package) => {
            out.extend_from_slice(&1u16.to_be_bytes());
            out.extend_from_slice(key_package);
        }
        WriteProposal::Remove(leaf) => {
            out.extend_from_slice(&3u16.to_be_bytes());
            out.extend_from_slice(&leaf.to_be_bytes());
        }
        WriteProposal::GroupContextExtensions(extensions) => {
            out.extend_from_slice(&7u16.to_be_bytes());
            let mut list = Vec::new();
            for (t, data) in extensions {
                list.extend_from_slice(&t.to_be_bytes());
                push_vector(&mut list, data);
            }
            push_vector(out, &list);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mls_framing::{
        CommitProposal, ContentType, Peek, Sender, WireFormat, commit_contents, peek,
        public_message_parts,
    };

    #[test]
    fn a_written_commit_reads_back_and_splits_into_its_parts() {
        let commit = WriteCommit {
            proposals: vec![
                WriteProposal::Remove(3),
                WriteProposal::GroupContextExtensions(vec![(0xF0C0, vec![0xA1, 0x01])]),
            ],
            path: None,
        };
        let content = commit_content(&[9; 32], 7, 2, &commit);
        let key = DeviceKeyPair::from_seed(&[4; 32]);
        let signature = sign_content(&key, &content, b"context");
        let message = public_message(&content, &signature, true);
        let Ok(Peek::Framed(f)) = peek(&message) else {
            panic!("peek");
        };
        assert_eq!(
            (f.wire_format, f.epoch, f.content_type, f.sender),
            (
                WireFormat::PublicMessage,
                7,
                ContentType::Commit,
                Some(Sender::Member(2))
            )
        );
        let read = commit_contents(&message).expect("contents");
        assert_eq!(
            read.by_value,
            vec![
                CommitProposal::Remove { leaf: 3 },
                CommitProposal::GroupContextExtensions {
                    extensions: vec![(0xF0C0, vec![0xA1, 0x01])]
                }
            ]
        );
        let parts = public_message_parts(&message).expect("parts");
        assert_eq!(parts.content, content);
        assert_eq!(parts.signature, signature);
        assert_eq!(parts.path, None);
        assert_eq!(
            parts.to_message(),
            message,
            "the parts join into the message again"
        );
        assert_eq!(parts.confirmation_tag.map(|t| t.len()), Some(TAG_BYTES));
        assert_eq!(parts.membership_tag.map(|t| t.len()), Some(TAG_BYTES));
    }

    #[test]
    fn signatures_cover_the_label_content_and_context() {
        let key = DeviceKeyPair::from_seed(&[4; 32]);
        let a = sign_content(&key, b"content", b"context");
        assert_eq!(
            a,
            sign_content(&key, b"content", b"context"),
            "Ed25519 is deterministic"
        );
        assert_ne!(a, sign_content(&key, b"content", b"context2"));
        assert_ne!(a, sign_content(&key, b"content2", b"context"));
        assert_ne!(a, sign_with_label(&key, "Other", b"content"));
    }

    #[test]
    fn a_private_message_header_reads_back() {
        let m = private_message(&[5; 32], 3, b"ciphertext");
        assert_eq!(
            peek(&m),
            Ok(Peek::Framed(crate::mls_framing::Framing {
                wire_format: WireFormat::PrivateMessage,
                group_id: vec![5; 32],
                epoch: 3,
                content_type: ContentType::Application,
                sender: None,
            }))
        );
    }
}
