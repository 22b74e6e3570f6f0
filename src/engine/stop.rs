//! Stop strings in streamed text. A stop string can span tokens ("<|im_" + "end|>") and must
//! never reach the client, so text that could still be the start of one is held back until the
//! next piece shows whether it is.

/// Watches text as it streams for any of a set of stop strings.
#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

/// What one piece of text brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopOutcome {
    /// Text that is safe to send now.
    pub text: String,
    /// A stop string was found: `text` ends just before it, and generation should end.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: impl IntoIterator<Item = String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), held: String::new() }
    }

    /// Adds a piece of generated text.
    pub fn push(&mut self, piece: &str) -> StopOutcome {
        if self.stops.is_empty() {
            return StopOutcome { text: piece.to_string(), stopped: false };
        }
        self.held.push_str(piece);
        // The earliest stop string wins.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome { text, stopped: true };
        }
        let keep = self.partial_suffix();
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        StopOutcome { text, stopped: false }
    }

    /// The text still held back when generation ends for another reason: it is output after all.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest suffix of the held text that is a proper prefix of a stop string.
    fn partial_suffix(&self) -> usize {
        let h = &self.held;
        let longest = self.stops.iter().map(|s| s.len() - 1).max().unwrap_or(0).min(h.len());
        (1..=longest)
            .rev()
            .find(|&n| h.is_char_boundary(h.len() - n) && self.stops.iter().any(|s| s.starts_with(&h[h.len() - n..])))
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()));
        let mut out = String::new();
        for p in pieces {
            let o = m.push(p);
            out += &o.text;
            if o.stopped {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stops_spanning_pieces_are_cut_and_never_sent() {
        assert_eq!(run(&["<|im_end|>"], &["Paris", ".<|im_", "end|> more"]), ("Paris.".into(), true));
        assert_eq!(run(&["\n\n", "END"], &["a\n", "b", "E", "N", "D!"]), ("a\nb".into(), true));
        // A held prefix that turns out not to be a stop is sent.
        assert_eq!(run(&["<stop>"], &["x <st", "ill going"]), ("x <still going".into(), false));
        assert_eq!(run(&["<stop>"], &["tail <sto"]), ("tail <sto".into(), false));
        // The earliest of two stops in one piece wins; multi-byte characters stay whole.
        assert_eq!(run(&["bb", "ab"], &["xxabb"]), ("xx".into(), true));
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn held_text_is_only_what_could_still_match() {
        let mut m = StopMatcher::new(["abc".to_string()]);
        assert_eq!(m.push("xxa").text, "xx");
        assert_eq!(m.push("b").text, "");
        assert_eq!(m.push("x").text, "abx");
    }
}
