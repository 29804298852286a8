//! What the gateway reads of an MLSMessage (SPEC.md section 7.2): the header of RFC 9420
//! section 6, without keys and without decrypting anything.
//!
//! ```text
//! MLSMessage   = version(u16) wire_format(u16) body
//! PublicMessage body:  group_id<V> epoch(u64) sender authenticated_data<V> content_type(u8) ...
//! PrivateMessage body: group_id<V> epoch(u64) content_type(u8) ...
//! Sender       = sender_type(u8) [leaf_index(u32) | sender_index(u32) | -]
//! ```
//!
//! `<V>` is the MLS variable-length vector (RFC 9420 section 2.1.2): a 1, 2 or 4 byte
//! length whose top two bits give its size, in its shortest form.

/// `mls10`, the only protocol version.
pub const MLS_VERSION_1_0: u16 = 1;

/// The MLSMessage wire formats (RFC 9420 section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WireFormat {
    /// `mls_public_message` (1).
    PublicMessage,
    /// `mls_private_message` (2).
    PrivateMessage,
    /// `mls_welcome` (3).
    Welcome,
    /// `mls_group_info` (4).
    GroupInfo,
    /// `mls_key_package` (5).
    KeyPackage,
    /// Any other value.
    Other(u16),
}

impl WireFormat {
    fn from_u16(v: u16) -> Self {
        match v {
            1 => WireFormat::PublicMessage,
            2 => WireFormat::PrivateMessage,
            3 => WireFormat::Welcome,
            4 => WireFormat::GroupInfo,
            5 => WireFormat::KeyPackage,
            other => WireFormat::Other(other),
        }
    }
}

/// Content types of framed messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ContentType {
    /// `application` (1).
    Application,
    /// `proposal` (2).
    Proposal,
    /// `commit` (3).
    Commit,
}

/// The sender of a PublicMessage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sender {
    /// A member at this leaf index.
    Member(u32),
    /// An external sender at this index of the `external_senders` extension.
    External(u32),
    /// A new member proposing its own Add.
    NewMemberProposal,
    /// A new member joining by external Commit.
    NewMemberCommit,
}

/// The framing fields of a PublicMessage or PrivateMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Framing {
    /// PublicMessage or PrivateMessage.
    pub wire_format: WireFormat,
    /// The MLS group id.
    pub group_id: Vec<u8>,
    /// The epoch the message was sent in.
    pub epoch: u64,
    /// The content type.
    pub content_type: ContentType,
    /// The sender, for a PublicMessage (a PrivateMessage encrypts it).
    pub sender: Option<Sender>,
}

/// The result of peeking at an MLSMessage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// A PublicMessage or PrivateMessage.
    Framed(Framing),
    /// A Welcome, GroupInfo or KeyPackage (or an unknown wire format), body unread.
    Unframed(WireFormat),
}

/// Why the bytes are not an MLSMessage the gateway can read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeekError {
    /// The input ends inside a field.
    #[error("truncated MLS message")]
    Truncated,
    /// The version is not mls10.
    #[error("unsupported MLS version {0}")]
    Version(u16),
    /// A vector length uses the reserved prefix or a longer form than needed.
    #[error("invalid variable-length integer")]
    VarInt,
    /// An unknown content type or sender type.
    #[error("invalid {0}")]
    Invalid(&'static str),
}

/// Reads the MLSMessage header of `bytes` (SPEC.md section 7.2).
pub fn peek(bytes: &[u8]) -> Result<Peek, PeekError> {
    peek_framing(&mut Cursor { bytes, pos: 0 })
}

/// Reads the header, leaving the cursor after the framing fields.
fn peek_framing(r: &mut Cursor<'_>) -> Result<Peek, PeekError> {
    let version = r.u16()?;
    if version != MLS_VERSION_1_0 {
        return Err(PeekError::Version(version));
    }
    let wire_format = WireFormat::from_u16(r.u16()?);
    match wire_format {
        WireFormat::PublicMessage => {
            let group_id = r.vector()?.to_vec();
            let epoch = r.u64()?;
            let sender = match r.u8()? {
                1 => Sender::Member(r.u32()?),
                2 => Sender::External(r.u32()?),
                3 => Sender::NewMemberProposal,
                4 => Sender::NewMemberCommit,
                _ => return Err(PeekError::Invalid("sender type")),
            };
            let _authenticated_data = r.vector()?;
            let content_type = content_type(r.u8()?)?;
            Ok(Peek::Framed(Framing {
                wire_format,
                group_id,
                epoch,
                content_type,
                sender: Some(sender),
            }))
        }
        WireFormat::PrivateMessage => {
            let group_id = r.vector()?.to_vec();
            let epoch = r.u64()?;
            let content_type = content_type(r.u8()?)?;
            Ok(Peek::Framed(Framing {
                wire_format,
                group_id,
                epoch,
                content_type,
                sender: None,
            }))
        }
        other => Ok(Peek::Unframed(other)),
    }
}

/// A proposal carried by value in a Commit, as far as the gateway needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitProposal {
    /// Add: the credential of the KeyPackage's leaf.
    Add {
        /// The credential type (1 = basic).
        credential_type: u16,
        /// For a basic credential, its identity; empty otherwise.
        identity: Vec<u8>,
    },
    /// Remove the member at this leaf.
    Remove {
        /// The leaf index.
        leaf: u32,
    },
    /// Replace the group context extensions with these `(type, data)` pairs.
    GroupContextExtensions {
        /// The extensions, in order.
        extensions: Vec<(u16, Vec<u8>)>,
    },
    /// Any other proposal type (update, PSK, ReInit, external init), identified by its
    /// type.
    Other {
        /// The proposal type.
        proposal_type: u16,
    },
}

/// The proposals of a PublicMessage Commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitContents {
    /// The framing of the message.
    pub framing: Framing,
    /// Proposals carried by value, in order.
    pub by_value: Vec<CommitProposal>,
    /// How many proposals are carried by reference.
    pub by_reference: usize,
}

/// Reads a PublicMessage Commit's proposals (SPEC.md 7.3 and 7.6): what it adds (by the
/// credential in each KeyPackage), what it removes (by leaf), and whether it refers to any
/// proposal by reference.
pub fn commit_contents(bytes: &[u8]) -> Result<CommitContents, PeekError> {
    let mut r = Cursor { bytes, pos: 0 };
    let framing = match peek_framing(&mut r)? {
        Peek::Framed(f)
            if f.wire_format == WireFormat::PublicMessage
                && f.content_type == ContentType::Commit =>
        {
            f
        }
        _ => return Err(PeekError::Invalid("not a PublicMessage Commit")),
    };
    let proposals = r.vector()?;
    let mut p = Cursor {
        bytes: proposals,
        pos: 0,
    };
    let (mut by_value, mut by_reference) = (Vec::new(), 0);
    while p.pos < proposals.len() {
        match p.u8()? {
            1 => by_value.push(proposal(&mut p)?),
            2 => {
                p.vector()?;
                by_reference += 1;
            }
            _ => return Err(PeekError::Invalid("proposal-or-ref type")),
        }
    }
    Ok(CommitContents {
        framing,
        by_value,
        by_reference,
    })
}

/// Reads a standalone PublicMessage proposal (SPEC.md 10.3 reads leave requests from it):
/// its framing and the proposal.
pub fn proposal_contents(bytes: &[u8]) -> Result<(Framing, CommitProposal), PeekError> {
    let mut r = Cursor { bytes, pos: 0 };
    match peek_framing(&mut r)? {
        Peek::Framed(f)
            if f.wire_format == WireFormat::PublicMessage
                && f.content_type == ContentType::Proposal =>
        {
            let proposal = proposal(&mut r)?;
            Ok((f, proposal))
        }
        _ => Err(PeekError::Invalid("not a PublicMessage proposal")),
    }
}

fn proposal(r: &mut Cursor<'_>) -> Result<CommitProposal, PeekError> {
    let proposal_type = r.u16()?;
    match proposal_type {
        // add: KeyPackage
        1 => {
            let _version = r.u16()?;
            let _cipher_suite = r.u16()?;
            let _init_key = r.vector()?;
            let (credential_type, identity) = leaf_node(r)?;
            let _extensions = r.vector()?;
            let _signature = r.vector()?;
            Ok(CommitProposal::Add {
                credential_type,
                identity,
            })
        }
        // update: LeafNode
        2 => {
            leaf_node(r)?;
            Ok(CommitProposal::Other { proposal_type })
        }
        // remove: uint32
        3 => Ok(CommitProposal::Remove { leaf: r.u32()? }),
        // psk: PreSharedKeyID
        4 => {
            match r.u8()? {
                1 => {
                    r.vector()?;
                }
                2 => {
                    r.u8()?;
                    r.vector()?;
                    r.u64()?;
                }
                _ => return Err(PeekError::Invalid("psk type")),
            }
            r.vector()?;
            Ok(CommitProposal::Other { proposal_type })
        }
        // reinit: group_id, version, cipher_suite, extensions
        5 => {
            r.vector()?;
            r.u16()?;
            r.u16()?;
            r.vector()?;
            Ok(CommitProposal::Other { proposal_type })
        }
        // external_init: kem_output
        6 => {
            r.vector()?;
            Ok(CommitProposal::Other { proposal_type })
        }
        // group_context_extensions: Extension extensions<V>
        7 => {
            let list = r.vector()?;
            let mut e = Cursor {
                bytes: list,
                pos: 0,
            };
            let mut extensions = Vec::new();
            while e.pos < list.len() {
                let extension_type = e.u16()?;
                extensions.push((extension_type, e.vector()?.to_vec()));
            }
            Ok(CommitProposal::GroupContextExtensions { extensions })
        }
        _ => Err(PeekError::Invalid("proposal type")),
    }
}

/// The fields of a LeafNode the gateway reads.
struct LeafFields {
    signature_key: Vec<u8>,
    credential_type: u16,
    identity: Vec<u8>,
    lifetime: Option<(u64, u64)>,
    extension_types: Vec<u16>,
}

/// Reads a LeafNode; returns its credential type and, for a basic credential, identity.
fn leaf_node(r: &mut Cursor<'_>) -> Result<(u16, Vec<u8>), PeekError> {
    let leaf = leaf_node_fields(r)?;
    Ok((leaf.credential_type, leaf.identity))
}

fn leaf_node_fields(r: &mut Cursor<'_>) -> Result<LeafFields, PeekError> {
    let _encryption_key = r.vector()?;
    let signature_key = r.vector()?.to_vec();
    let credential_type = r.u16()?;
    let identity = match credential_type {
        1 => r.vector()?.to_vec(),
        // x509: a vector of certificates, each a vector.
        2 => {
            r.vector()?;
            Vec::new()
        }
        _ => return Err(PeekError::Invalid("credential type")),
    };
    // Capabilities: versions, cipher_suites, extensions, proposals, credentials.
    let mut extension_types = Vec::new();
    for field in 0..5 {
        let list = r.vector()?;
        if field == 2 {
            let mut e = Cursor {
                bytes: list,
                pos: 0,
            };
            while e.pos < list.len() {
                extension_types.push(e.u16()?);
            }
        }
    }
    let lifetime = match r.u8()? {
        1 => Some((r.u64()?, r.u64()?)),
        2 => None,
        3 => {
            r.vector()?;
            None
        }
        _ => return Err(PeekError::Invalid("leaf node source")),
    };
    let _extensions = r.vector()?;
    let _signature = r.vector()?;
    Ok(LeafFields {
        signature_key,
        credential_type,
        identity,
        lifetime,
        extension_types,
    })
}

/// What the gateway checks of an uploaded KeyPackage (SPEC.md section 8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPackageInfo {
    /// The ciphersuite.
    pub cipher_suite: u16,
    /// The leaf's credential type (1 basic, 2 x509).
    pub credential_type: u16,
    /// A basic credential's identity (empty for others).
    pub identity: Vec<u8>,
    /// The leaf's signature public key.
    pub signature_key: Vec<u8>,
    /// The leaf's lifetime `(not_before, not_after)` in seconds since the Unix epoch, when
    /// its source is `key_package`.
    pub lifetime: Option<(u64, u64)>,
    /// The extension types the leaf's capabilities list (SPEC.md REQ-10-1 asks for
    /// `confab_room_roles`).
    pub extension_types: Vec<u16>,
    /// `KeyPackageTBS`: the bytes the KeyPackage's signature covers.
    pub tbs: Vec<u8>,
    /// The KeyPackage's signature.
    pub signature: Vec<u8>,
}

impl KeyPackageInfo {
    /// Checks the KeyPackage's Ed25519 signature by its own leaf's signature key
    /// (`SignWithLabel(., "KeyPackageTBS", KeyPackageTBS)`, RFC 9420 sections 5.1.2 and
    /// 10), with strict verification.
    pub fn verify_signature(&self) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(self.signature_key.as_slice()) else {
            return false;
        };
        let Ok(signature) = <[u8; 64]>::try_from(self.signature.as_slice()) else {
            return false;
        };
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
            return false;
        };
        let mut content = Vec::with_capacity(self.tbs.len() + 32);
        push_vector(&mut content, b"MLS 1.0 KeyPackageTBS");
        push_vector(&mut content, &self.tbs);
        key.verify_strict(&content, &ed25519_dalek::Signature::from_bytes(&signature))
            .is_ok()
    }
}

/// Reads an MLSMessage carrying a KeyPackage, which must be the whole of `bytes`.
pub fn key_package(bytes: &[u8]) -> Result<KeyPackageInfo, PeekError> {
    let r = &mut Cursor { bytes, pos: 0 };
    let version = r.u16()?;
    if version != MLS_VERSION_1_0 {
        return Err(PeekError::Version(version));
    }
    if WireFormat::from_u16(r.u16()?) != WireFormat::KeyPackage {
        return Err(PeekError::Invalid("wire format (not a KeyPackage)"));
    }
    let start = r.pos;
    let kp_version = r.u16()?;
    if kp_version != MLS_VERSION_1_0 {
        return Err(PeekError::Version(kp_version));
    }
    let cipher_suite = r.u16()?;
    let _init_key = r.vector()?;
    let leaf = leaf_node_fields(r)?;
    let _extensions = r.vector()?;
    let tbs = bytes[start..r.pos].to_vec();
    let signature = r.vector()?.to_vec();
    if r.pos != bytes.len() {
        return Err(PeekError::Invalid("trailing bytes after the KeyPackage"));
    }
    Ok(KeyPackageInfo {
        cipher_suite,
        credential_type: leaf.credential_type,
        identity: leaf.identity,
        signature_key: leaf.signature_key,
        lifetime: leaf.lifetime,
        extension_types: leaf.extension_types,
        tbs,
        signature,
    })
}

/// A PublicMessage cut into its parts (RFC 9420 section 6.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicMessageParts {
    /// The `FramedContent` bytes, which the signature covers (with the group context).
    pub content: Vec<u8>,
    /// For a Commit, its encoded `UpdatePath`, when it has one.
    pub path: Option<Vec<u8>>,
    /// The signature.
    pub signature: Vec<u8>,
    /// A Commit's confirmation tag.
    pub confirmation_tag: Option<Vec<u8>>,
    /// A member sender's membership tag.
    pub membership_tag: Option<Vec<u8>>,
}

impl PublicMessageParts {
    /// The PublicMessage MLSMessage of these parts (the inverse of
    /// [`public_message_parts`]; a test may change a part in between).
    pub fn to_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(self.content.len() + self.signature.len() + 80);
        m.extend_from_slice(&MLS_VERSION_1_0.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m.extend_from_slice(&self.content);
        push_vector(&mut m, &self.signature);
        if let Some(tag) = &self.confirmation_tag {
            push_vector(&mut m, tag);
        }
        if let Some(tag) = &self.membership_tag {
            push_vector(&mut m, tag);
        }
        m
    }
}

/// Cuts a PublicMessage MLSMessage into its parts; the bytes must hold exactly one.
pub fn public_message_parts(bytes: &[u8]) -> Result<PublicMessageParts, PeekError> {
    let mut r = Cursor { bytes, pos: 0 };
    let framing = match peek_framing(&mut r)? {
        Peek::Framed(f) if f.wire_format == WireFormat::PublicMessage => f,
        _ => return Err(PeekError::Invalid("not a PublicMessage")),
    };
    let mut path = None;
    match framing.content_type {
        ContentType::Application => {
            r.vector()?;
        }
        ContentType::Proposal => {
            proposal(&mut r)?;
        }
        ContentType::Commit => {
            r.vector()?;
            match r.u8()? {
                0 => {}
                1 => {
                    let start = r.pos;
                    leaf_node_fields(&mut r)?;
                    r.vector()?;
                    path = Some(bytes[start..r.pos].to_vec());
                }
                _ => return Err(PeekError::Invalid("optional path")),
            }
        }
    }
    // The content starts after version and wire format.
    let content = bytes[4..r.pos].to_vec();
    let signature = r.vector()?.to_vec();
    let confirmation_tag = match framing.content_type {
        ContentType::Commit => Some(r.vector()?.to_vec()),
        _ => None,
    };
    let membership_tag = match framing.sender {
        Some(Sender::Member(_)) => Some(r.vector()?.to_vec()),
        _ => None,
    };
    if r.pos != bytes.len() {
        return Err(PeekError::Invalid("trailing bytes after the PublicMessage"));
    }
    Ok(PublicMessageParts {
        content,
        path,
        signature,
        confirmation_tag,
        membership_tag,
    })
}

/// The `GroupContext` bytes of an MLSMessage carrying a GroupInfo (RFC 9420 section
/// 12.4.3): version, ciphersuite, group id, epoch, tree hash, confirmed transcript hash and
/// extensions.
pub fn group_info_context(bytes: &[u8]) -> Result<&[u8], PeekError> {
    let mut r = Cursor { bytes, pos: 0 };
    let version = r.u16()?;
    if version != MLS_VERSION_1_0 {
        return Err(PeekError::Version(version));
    }
    if WireFormat::from_u16(r.u16()?) != WireFormat::GroupInfo {
        return Err(PeekError::Invalid("wire format (not a GroupInfo)"));
    }
    let start = r.pos;
    r.u16()?; // version
    r.u16()?; // cipher suite
    r.vector()?; // group id
    r.u64()?; // epoch
    r.vector()?; // tree hash
    r.vector()?; // confirmed transcript hash
    r.vector()?; // extensions
    Ok(&bytes[start..r.pos])
}

/// A GroupInfo MLSMessage cut into its fields (RFC 9420 section 12.4.3), so that a test
/// or a conformance case can change one and sign again ([`crate::mls_write::group_info`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfoParts {
    /// The encoded `GroupContext`.
    pub group_context: Vec<u8>,
    /// The encoded GroupInfo extensions (the whole vector, its length included).
    pub extensions: Vec<u8>,
    /// The confirmation tag.
    pub confirmation_tag: Vec<u8>,
    /// The signer's leaf index.
    pub signer: u32,
    /// The signature over `GroupInfoTBS`.
    pub signature: Vec<u8>,
}

impl GroupInfoParts {
    /// The `GroupInfoTBS` the signature covers: everything but the signature.
    pub fn to_be_signed(&self) -> Vec<u8> {
        let mut tbs = Vec::with_capacity(
            self.group_context.len() + self.extensions.len() + self.confirmation_tag.len() + 8,
        );
        tbs.extend_from_slice(&self.group_context);
        tbs.extend_from_slice(&self.extensions);
        push_vector(&mut tbs, &self.confirmation_tag);
        tbs.extend_from_slice(&self.signer.to_be_bytes());
        tbs
    }

    /// The epoch of the group context: the epoch the GroupInfo is of.
    pub fn epoch(&self) -> Result<u64, PeekError> {
        let mut r = Cursor {
            bytes: &self.group_context,
            pos: 0,
        };
        r.u16()?; // version
        r.u16()?; // cipher suite
        r.vector()?; // group id
        r.u64()
    }

    /// Whether the GroupInfo's extensions hold one of `extension_type` (for example 2,
    /// `ratchet_tree`).
    pub fn has_extension(&self, extension_type: u16) -> Result<bool, PeekError> {
        let list = Cursor {
            bytes: &self.extensions,
            pos: 0,
        }
        .vector()?;
        let mut r = Cursor {
            bytes: list,
            pos: 0,
        };
        while r.pos < list.len() {
            let kind = r.u16()?;
            r.vector()?;
            if kind == extension_type {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The MLSMessage of these parts (the inverse of [`group_info_parts`]).
    pub fn to_message(&self) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&MLS_VERSION_1_0.to_be_bytes());
        m.extend_from_slice(&4u16.to_be_bytes());
        m.extend_from_slice(&self.to_be_signed());
        push_vector(&mut m, &self.signature);
        m
    }
}

/// Cuts a GroupInfo MLSMessage into its parts; the bytes must hold exactly one.
pub fn group_info_parts(bytes: &[u8]) -> Result<GroupInfoParts, PeekError> {
    let context = group_info_context(bytes)?;
    let mut r = Cursor {
        bytes,
        pos: 4 + context.len(),
    };
    let start = r.pos;
    r.vector()?;
    let extensions = bytes[start..r.pos].to_vec();
    let confirmation_tag = r.vector()?.to_vec();
    let signer = r.u32()?;
    let signature = r.vector()?.to_vec();
    if r.pos != bytes.len() {
        return Err(PeekError::Invalid("trailing bytes after the GroupInfo"));
    }
    Ok(GroupInfoParts {
        group_context: context.to_vec(),
        extensions,
        confirmation_tag,
        signer,
        signature,
    })
}

/// Appends an MLS variable-length vector holding `data` (at most 2^30 - 1 bytes).
pub(crate) fn push_vector(out: &mut Vec<u8>, data: &[u8]) {
    let len = data.len();
    if len < 64 {
        out.push(len as u8);
    } else if len < 16_384 {
        out.extend_from_slice(&(0x4000u16 | len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&(0x8000_0000u32 | len as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
}

fn content_type(v: u8) -> Result<ContentType, PeekError> {
    match v {
        1 => Ok(ContentType::Application),
        2 => Ok(ContentType::Proposal),
        3 => Ok(ContentType::Commit),
        _ => Err(PeekError::Invalid("content type")),
    }
}

/// A bounds-checked reader of TLS-presentation-language fields.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PeekError> {
        let end = self.pos.checked_add(n).ok_or(PeekError::Truncated)?;
        let out = self.bytes.get(self.pos..end).ok_or(PeekError::Truncated)?;
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, PeekError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, PeekError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, PeekError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, PeekError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// An MLS variable-length vector: its length, then that many bytes.
    fn vector(&mut self) -> Result<&'a [u8], PeekError> {
        let first = self.u8()?;
        let len = match first >> 6 {
            0 => u32::from(first & 0x3f),
            1 => {
                let v = (u32::from(first & 0x3f) << 8) | u32::from(self.u8()?);
                if v < 64 {
                    return Err(PeekError::VarInt);
                }
                v
            }
            2 => {
                let rest = self.take(3)?;
                let v = (u32::from(first & 0x3f) << 24)
                    | (u32::from(rest[0]) << 16)
                    | (u32::from(rest[1]) << 8)
                    | u32::from(rest[2]);
                if v < 16_384 {
                    return Err(PeekError::VarInt);
                }
                v
            }
            _ => return Err(PeekError::VarInt),
        };
        self.take(len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_group_infos_epoch_and_extensions() {
        let mut group_context = vec![0, 1, 0, 1, 2, 0xAA, 0xBB];
        group_context.extend_from_slice(&7u64.to_be_bytes());
        let parts = GroupInfoParts {
            group_context,
            // One extension: type 2 (ratchet_tree) with one byte of data.
            extensions: vec![4, 0, 2, 1, 0x01],
            confirmation_tag: vec![0xC7; 32],
            signer: 0,
            signature: vec![0x55; 64],
        };
        assert_eq!(parts.epoch(), Ok(7));
        assert_eq!(parts.has_extension(2), Ok(true));
        assert_eq!(parts.has_extension(5), Ok(false));
        let cut = GroupInfoParts {
            extensions: vec![4, 0, 2, 3, 0x01],
            ..parts
        };
        assert!(
            cut.has_extension(5).is_err(),
            "a length past the list's end"
        );
    }

    #[test]
    fn reads_a_private_message_header() {
        let mut m = vec![0, 1, 0, 2, 3, 0xAA, 0xBB, 0xCC];
        m.extend_from_slice(&7u64.to_be_bytes());
        m.push(1);
        let p = peek(&m).expect("peek");
        assert_eq!(
            p,
            Peek::Framed(Framing {
                wire_format: WireFormat::PrivateMessage,
                group_id: vec![0xAA, 0xBB, 0xCC],
                epoch: 7,
                content_type: ContentType::Application,
                sender: None,
            })
        );
    }

    #[test]
    fn rejects_truncation_bad_version_and_long_varints() {
        assert_eq!(peek(&[0, 1, 0]), Err(PeekError::Truncated));
        assert_eq!(peek(&[0, 2, 0, 1]), Err(PeekError::Version(2)));
        // group_id length 3 encoded in two bytes.
        assert_eq!(
            peek(&[0, 1, 0, 2, 0x40, 3, 1, 2, 3]),
            Err(PeekError::VarInt)
        );
        assert_eq!(peek(&[0, 1, 0, 2, 0xC0]), Err(PeekError::VarInt));
        assert_eq!(peek(&[0, 1, 0, 3]), Ok(Peek::Unframed(WireFormat::Welcome)));
    }
}
