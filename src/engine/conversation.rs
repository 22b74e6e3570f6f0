//! A chat conversation: an optional system message and the turns after it, saved and loaded as
//! a JSON array of `{"role", "content"}` messages (the OpenAI chat format, system message
//! first), so that a conversation can be continued later or sent to any chat API.
use super::chat_template::Message;
use crate::error::{Error, Result};
use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    pub system: Option<String>,
    /// User and assistant messages, oldest first.
    pub turns: Vec<Message>,
}

impl Conversation {
    /// The messages as a chat template renders them: the system message first.
    pub fn messages(&self) -> Vec<Message> {
        let mut m: Vec<Message> = self.system.iter().map(|s| Message::new("system", s)).collect();
        m.extend(self.turns.iter().cloned());
        m
    }

    /// Writes the messages to `path` as JSON, atomically (a temporary file beside it, renamed
    /// when complete).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(&self.messages()).map_err(|e| Error::msg(e.to_string()))? + "\n";
        crate::error::persist_file(crate::error::temp_beside(path)?, path, text.as_bytes())
    }

    /// Reads a conversation saved by [`Conversation::save`] (or any JSON array of messages with
    /// roles system, user and assistant; a system message only first).
    pub fn load(path: &Path) -> Result<Self> {
        let messages: Vec<Message> = crate::error::read_json(path)?;
        let mut conv = Conversation::default();
        for (i, m) in messages.into_iter().enumerate() {
            match m.role.as_str() {
                "system" if i == 0 => conv.system = Some(m.content),
                "user" | "assistant" => conv.turns.push(m),
                other => {
                    return Err(Error::msg(format!(
                        "{}: message {i} has role {other:?}; expected system (first only), user or assistant",
                        path.display()
                    )))
                }
            }
        }
        Ok(conv)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_and_load_round_trip_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let conv = Conversation { system: Some("be brief".into()), turns: vec![Message::new("user", "hi"), Message::new("assistant", "hello")] };
        let p = dir.path().join("c.json");
        conv.save(&p).unwrap();
        assert_eq!(Conversation::load(&p).unwrap(), conv);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.contains("\"role\": \"system\""), "{text}");
        std::fs::write(&p, r#"[{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]"#).unwrap();
        let e = Conversation::load(&p).unwrap_err().to_string();
        assert!(e.contains("c.json") && e.contains("message 1") && e.contains("\"system\""), "{e}");
        std::fs::write(&p, r#"{"role": "user"}"#).unwrap();
        assert!(Conversation::load(&p).unwrap_err().to_string().contains("c.json"));
        let e = conv.save(&dir.path().join("no/such/dir/c.json")).unwrap_err().to_string();
        assert!(e.contains("no/such/dir/c.json"), "{e}");
    }
}
