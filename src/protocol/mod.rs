//! The wire protocol of `/ws` (docs/protocol.md §WebSocket `/ws`): inbound verbs and outbound frames.
//!
//! Inbound frames are parsed into [`Inbound`] with the seed's leniency (junk
//! subscribe entries are skipped, `lastSeq` is floored at 0) and its error
//! codes. Outbound frames are JSON text; provider events are serialised once
//! by the owner node and shared by every socket as a cheap-to-clone [`Frame`].

mod inbound;
mod outbound;

pub use inbound::{Inbound, MAX_CLIENT_REQUEST_ID, PermissionAnswer, SubscribeTarget, parse_inbound};
pub use outbound::{
    ErrorCode, EventBody, Frame, ProtocolError, chat_accepted, chat_subscribed, connected, for_upstream_client,
    gateway_id, now_iso, protocol_error, sequenced, session_upserted,
};
