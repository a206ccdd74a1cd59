//! The channel names of one publish, in one buffer.
//!
//! A notification to 1,000 users names 1,000 channels; as 1,000 `String`s it cost 1,000
//! allocations to render and as many frees when the publish was done, a visible share of the
//! node's CPU per delivery. Here the names are written one after the other into one string
//! and found again by where each ends.

/// Channel names, in the order they were pushed.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ChannelList {
    text: String,
    ends: Vec<usize>,
}

impl ChannelList {
    /// Room for `channels` names of `bytes` bytes in all.
    pub fn with_capacity(channels: usize, bytes: usize) -> ChannelList {
        ChannelList {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(channels),
        }
    }

    /// Appends the name `prefix` + `name` (no separator), without a `String` of its own.
    pub fn push_joined(&mut self, prefix: &str, name: &str) {
        self.text.push_str(prefix);
        self.text.push_str(name);
        self.ends.push(self.text.len());
    }

    pub fn push(&mut self, name: &str) {
        self.push_joined("", name);
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The `i`-th name; panics past the end, like indexing a slice.
    pub fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }
}

impl<'a> FromIterator<&'a str> for ChannelList {
    fn from_iter<I: IntoIterator<Item = &'a str>>(names: I) -> ChannelList {
        let mut list = ChannelList::default();
        for name in names {
            list.push(name);
        }
        list
    }
}

impl std::fmt::Debug for ChannelList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_back_in_order_and_whole() {
        let mut list = ChannelList::with_capacity(3, 16);
        list.push_joined("p:u:", "ann");
        list.push("");
        list.push_joined("p:u:", "bób");
        assert_eq!(list.len(), 3);
        assert_eq!(list.iter().collect::<Vec<_>>(), ["p:u:ann", "", "p:u:bób"]);
        assert_eq!(list.get(2), "p:u:bób");
        let same: ChannelList = ["p:u:ann", "", "p:u:bób"].into_iter().collect();
        assert_eq!(list, same);
        assert!(ChannelList::default().is_empty());
    }
}
