//! What a message is addressed to, and the broker channel names that carry it.
//!
//! Everything above the hub speaks [`Channel`]; the names (`{prefix}:u:{user}`,
//! `{prefix}:t:{tenant}`, `{prefix}:all`) exist only where the hub talks to the broker.

use crate::broker::ChannelList;

/// A broker channel, by what it reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel<'a> {
    /// Every connection of one user.
    User(&'a str),
    /// Every connection of every user of one tenant.
    Tenant(&'a str),
    /// Every connection on every node.
    Everyone,
}

/// Channel names for one installation prefix.
pub(super) struct ChannelNames {
    user_prefix: String,
    tenant_prefix: String,
    everyone: String,
}

impl ChannelNames {
    pub(super) fn new(prefix: &str) -> ChannelNames {
        ChannelNames {
            user_prefix: format!("{prefix}:u:"),
            tenant_prefix: format!("{prefix}:t:"),
            everyone: format!("{prefix}:all"),
        }
    }

    /// The broker's name for `channel`. One allocation of the exact size: a publish to many
    /// users renders one name per recipient, and the formatting machinery cost more than the
    /// copy.
    pub(super) fn render(&self, channel: Channel<'_>) -> String {
        let (prefix, name) = self.parts(channel);
        let mut s = String::with_capacity(prefix.len() + name.len());
        s.push_str(prefix);
        s.push_str(name);
        s
    }

    /// Appends the broker's name for `channel` to `list`: a publish to many users renders one
    /// name per recipient, all into one buffer (`ChannelList`).
    pub(super) fn render_into(&self, list: &mut ChannelList, channel: Channel<'_>) {
        let (prefix, name) = self.parts(channel);
        list.push_joined(prefix, name);
    }

    /// Bytes [`render_into`](Self::render_into) appends for `channel`.
    pub(super) fn rendered_len(&self, channel: Channel<'_>) -> usize {
        let (prefix, name) = self.parts(channel);
        prefix.len() + name.len()
    }

    /// The broker's name for `channel`, as a prefix and what follows it.
    fn parts<'a>(&'a self, channel: Channel<'a>) -> (&'a str, &'a str) {
        match channel {
            Channel::User(u) => (&self.user_prefix, u),
            Channel::Tenant(t) => (&self.tenant_prefix, t),
            Channel::Everyone => (&self.everyone, ""),
        }
    }

    /// The channel a broker name stands for; `None` for a name this node never subscribes.
    pub(super) fn parse<'a>(&self, name: &'a str) -> Option<Channel<'a>> {
        if let Some(u) = name.strip_prefix(self.user_prefix.as_str()) {
            Some(Channel::User(u))
        } else if let Some(t) = name.strip_prefix(self.tenant_prefix.as_str()) {
            Some(Channel::Tenant(t))
        } else if name == self.everyone {
            Some(Channel::Everyone)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let names = ChannelNames::new("wsgate");
        for (channel, name) in [
            (Channel::User("john"), "wsgate:u:john"),
            (Channel::Tenant("ACME"), "wsgate:t:ACME"),
            (Channel::Everyone, "wsgate:all"),
        ] {
            assert_eq!(names.render(channel), name);
            let mut list = ChannelList::default();
            names.render_into(&mut list, channel);
            assert_eq!(
                (list.get(0), names.rendered_len(channel)),
                (name, name.len())
            );
            assert_eq!(names.parse(name), Some(channel));
        }
        assert_eq!(names.parse("wsgate:canary:n1"), None);
        assert_eq!(names.parse("other:u:john"), None);
    }
}
