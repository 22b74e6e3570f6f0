//! Rendering a conversation through the model's own (Jinja) chat template, with the helpers HF
//! templates rely on: Python string/dict methods, `raise_exception`, `strftime_now`, `tojson`.
use crate::error::{Error, Result};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// An assistant's calls of tools, as OpenAI's API sends them back (`[{"id", "type",
    /// "function": {"name", "arguments"}}]`); templates that know tools render them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message's answer: to which call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self { role: role.to_string(), content: content.to_string(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// Whether the template reads `tools` (HF's variable for the functions a model may call).
    knows_tools: bool,
}

/// Steps (minijinja's fuel: one per instruction) a rendering may take. A real template takes a few
/// hundred per message; a hostile one (`{% for i in range(100000) %}...` nested) stops here, in
/// well under a second, with an error instead of hanging the chat or the server.
pub const FUEL_PER_RENDER: u64 = 20_000_000;

/// Bytes a rendering may produce beyond the messages' own text: a template that repeats a long
/// string in a loop stops with an error instead of filling the memory.
pub const MAX_EXTRA_OUTPUT: usize = 4 << 20;

/// The template used for models that ship none: ChatML.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

impl ChatTemplate {
    pub fn new(template: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(FUEL_PER_RENDER));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date" in system prompts; the UTC date is enough.
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            format_date(secs, &fmt)
        });
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| Error::msg(format!("chat template does not compile: {e}")))?;
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            knows_tools: template.contains("tools"),
        })
    }

    /// Whether the template shows the model the `tools` it is given ([`Self::render_with_tools`]).
    pub fn knows_tools(&self) -> bool {
        self.knows_tools
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends where the assistant starts.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// As [`Self::render`], with the functions the model may call (OpenAI's `tools` list) as the
    /// template's `tools`.
    pub fn render_with_tools(&self, messages: &[Message], add_generation_prompt: bool, tools: Option<&serde_json::Value>) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::msg(e.to_string()))?;
        // The messages appear once or twice in any real template's output.
        let extra = |v: Option<&serde_json::Value>| v.map_or(0, |v| v.to_string().len());
        let text: usize = messages.iter().map(|m| m.role.len() + m.content.len() + extra(m.tool_calls.as_ref())).sum::<usize>() + extra(tools);
        let limit = MAX_EXTRA_OUTPUT + 2 * text;
        let mut out = BoundedOutput { bytes: Vec::new(), limit, overflowed: false };
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
            tools => tools,
        };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes).map_err(|_| Error::msg("chat template: output is not UTF-8")),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => Err(Error::msg(format!(
                "chat template: rendering took more than {FUEL_PER_RENDER} steps (a loop that does not end?)"
            ))),
            Err(_) if out.overflowed => Err(Error::msg(format!(
                "chat template: output exceeds {limit} bytes for {} messages of {text} bytes",
                messages.len()
            ))),
            Err(e) => Err(Error::msg(format!("chat template: {e}"))),
        }
    }
}

/// A `Vec` writer that refuses to grow past `limit` bytes.
struct BoundedOutput {
    bytes: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.limit {
            self.overflowed = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Civil date from a Unix time (Howard Hinnant's algorithm), formatted with %Y %m %d %B %b.
fn format_date(secs: u64, fmt: &str) -> String {
    let days = (secs / 86_400) as i64;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    const MONTHS: [&str; 12] = [
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December",
    ];
    let month = MONTHS[(m - 1) as usize];
    fmt.replace("%Y", &y.to_string())
        .replace("%m", &format!("{m:02}"))
        .replace("%d", &format!("{d:02}"))
        .replace("%B", month)
        .replace("%b", &month[..3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_turns_and_generation_prompt() {
        let t = ChatTemplate::new(CHATML, None, None).unwrap();
        let s = t.render(&[Message::new("user", "hi")], true).unwrap();
        assert_eq!(s, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'bad' %}{{ raise_exception('no') }}{% endif %}{{ messages[0]['content'].strip().upper() }}{{ bos_token }}",
            Some("<s>"),
            None,
        )
        .unwrap();
        assert_eq!(t.render(&[Message::new("user", "  x ")], false).unwrap(), "X<s>");
        assert!(t.render(&[Message::new("bad", "x")], false).unwrap_err().to_string().contains("no"));
    }

    #[test]
    fn endless_and_huge_templates_stop_with_an_error() {
        let m = [Message::new("user", "hi")];
        let endless = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
        let e = ChatTemplate::new(endless, None, None).unwrap().render(&m, true).unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
        let huge = "{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}";
        let e = ChatTemplate::new(huge, None, None).unwrap().render(&m, true).unwrap_err().to_string();
        assert!(e.contains("output exceeds"), "{e}");
        let deep = "{{ ".to_string() + &"(".repeat(5000) + "1" + &")".repeat(5000) + " }}";
        assert!(ChatTemplate::new(&deep, None, None).is_err());
    }

    /// Tools and calls reach the template as HF templates read them: `tools` as given, a call's
    /// arguments an object; a template without `tools` says so.
    #[test]
    fn tools_and_tool_calls_reach_the_template() {
        let src = "{% if tools %}[{{ tools[0].function.name }}]{% endif %}{% for m in messages %}{{ m.role }}:{{ m.content }}{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}{% endif %}{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %};{% endfor %}";
        let t = ChatTemplate::new(src, None, None).unwrap();
        assert!(t.knows_tools());
        let tools = serde_json::json!([{"type": "function", "function": {"name": "f"}}]);
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(serde_json::json!([{"function": {"name": "f", "arguments": {"city": "Oslo"}}}]));
        let mut answer = Message::new("tool", "sunny");
        answer.tool_call_id = Some("c1".into());
        let out = t.render_with_tools(&[Message::new("user", "hi"), call, answer], false, Some(&tools)).unwrap();
        assert_eq!(out, "[f]user:hi;assistant:Oslo;tool:sunny#c1;");
        assert_eq!(t.render(&[Message::new("user", "hi")], false).unwrap(), "user:hi;", "no tools: none shown");
        assert!(!ChatTemplate::new(CHATML, None, None).unwrap().knows_tools());
    }

    #[test]
    fn dates() {
        assert_eq!(format_date(0, "%d %B %Y"), "01 January 1970");
        assert_eq!(format_date(1_795_000_000, "%Y-%m-%d"), "2026-11-18");
    }
}
