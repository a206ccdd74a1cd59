//! Who a connection belongs to. Produced by [`crate::auth`] (from the back-end's answer), held by
//! the hub for routing; it depends on nothing, so the hub does not need the back-end to know
//! whom it serves.

use std::sync::Arc;

/// Who an API key belongs to, as the back-end says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Arc<str>,
    pub tenant_id: Option<Arc<str>>,
}
