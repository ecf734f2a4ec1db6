//! [`LiveSet`]: which seqs of one segment are still live, one bit per seq.
//!
//! A segment holds a contiguous run of seqs (gaps only where an append failed), so a bit vector
//! indexed by `seq - base_seq` costs an eighth of a byte per message, which keeps a million queued
//! messages at about 125 KiB of bookkeeping.

/// A growable bit set with a count of set bits.
#[derive(Debug, Default, Clone)]
pub(crate) struct LiveSet {
    words: Vec<u64>,
    count: u64,
}

impl LiveSet {
    /// Marks `index` live. Returns false if it already was.
    pub fn insert(&mut self, index: u64) -> bool {
        let (word, mask) = Self::position(index);
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & mask != 0 {
            return false;
        }
        self.words[word] |= mask;
        self.count += 1;
        true
    }

    /// Clears `index`. Returns false if it was not live.
    pub fn remove(&mut self, index: u64) -> bool {
        let (word, mask) = Self::position(index);
        match self.words.get_mut(word) {
            Some(bits) if *bits & mask != 0 => {
                *bits &= !mask;
                self.count -= 1;
                true
            }
            _ => false,
        }
    }

    /// True if `index` is live.
    pub fn contains(&self, index: u64) -> bool {
        let (word, mask) = Self::position(index);
        self.words.get(word).is_some_and(|bits| bits & mask != 0)
    }

    /// How many are live.
    pub fn count(&self) -> u64 {
        self.count
    }

    fn position(index: u64) -> (usize, u64) {
        ((index / 64) as usize, 1u64 << (index % 64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_membership_and_count() {
        let mut set = LiveSet::default();
        assert!(set.insert(3));
        assert!(set.insert(130));
        assert!(!set.insert(3));
        assert_eq!(set.count(), 2);
        assert!(set.remove(3));
        assert!(!set.remove(3));
        assert!(!set.remove(10_000));
        assert!(!set.contains(3));
        assert!(set.contains(130));
        assert_eq!(set.count(), 1);
    }
}
