//! Chat templates: the model's Jinja template (GGUF `tokenizer.chat_template` or
//! `tokenizer_config.json`'s `chat_template`) rendered with `minijinja` the way Hugging Face's
//! `apply_chat_template` renders it with jinja2: `trim_blocks` and `lstrip_blocks` on,
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token` in scope,
//! `raise_exception(msg)` as an error, and Python's string methods (`strip`, `startswith`, ...).
//!
//! A template comes from a model file, so it is untrusted: rendering runs on a fuel budget and a
//! template that errors, loops or raises gives `ChatTemplate`, never a panic or a hang.

use minijinja::syntax::SyntaxConfig;
use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::error::{Result, TwinferError};

/// Instructions a render may spend: far above any real template (the longest Hub templates
/// spend a few thousand per message), far below a hang.
const FUEL: u64 = 5_000_000;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant` (templates may accept others, such as `tool`).
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A compiled chat template and the special tokens it may name.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        let source = self.env.get_template("chat").expect("compiled in new").source().to_string();
        Self::new(source, self.bos_token.clone(), self.eos_token.clone()).expect("compiled before")
    }
}

fn raise_exception(message: String) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is `ChatTemplate` with minijinja's line and reason.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| TwinferError::ChatTemplate(describe(&e)))?);
        env.set_fuel(Some(FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source).map_err(|e| TwinferError::ChatTemplate(describe(&e)))?;
        Ok(Self { env, bos_token, eos_token })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends where the assistant's
    /// answer begins.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let messages: Vec<Value> =
            messages.iter().map(|m| context! { role => m.role.clone(), content => m.content.clone() }).collect();
        let template = self.env.get_template("chat").map_err(|e| TwinferError::ChatTemplate(describe(&e)))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone(),
                eos_token => self.eos_token.clone(),
            })
            .map_err(|e| TwinferError::ChatTemplate(describe(&e)))
    }
}

/// minijinja's error with its line, and the reason (`raise_exception`'s message) when it has one.
fn describe(e: &Error) -> String {
    let mut s = match e.line() {
        Some(line) => format!("line {line}: {}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(detail) = e.detail() {
        s.push_str(": ");
        s.push_str(detail);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}\
{{ '<|im_start|>system\nYou are helpful<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + \
message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML.into(), "<s>".into(), "</s>".into()).unwrap();
        let text = t.render(&[ChatMessage::user("Hi")], true).unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let with_system = t.render(&[ChatMessage::system("Be brief."), ChatMessage::user("Hi")], false).unwrap();
        assert!(
            with_system.starts_with("<|im_start|>system\nBe brief.<|im_end|>") && !with_system.ends_with("assistant\n")
        );
    }

    /// Block tags on their own lines leave no blank lines (trim_blocks + lstrip_blocks), Python
    /// string methods work, and the special tokens are in scope.
    #[test]
    fn behaves_like_hugging_face_jinja() {
        let src = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}\n{{ eos_token }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(t.render(&[ChatMessage::user("  hi  ")], false).unwrap(), "<s>\n[hi]\n</s>");
    }

    #[test]
    fn bad_templates_are_typed_errors_not_hangs() {
        let err = |src: &str| {
            let t = ChatTemplate::new(src.into(), String::new(), String::new());
            t.and_then(|t| t.render(&[ChatMessage::user("x")], true)).unwrap_err()
        };
        assert!(matches!(err("{% for m in messages %}"), TwinferError::ChatTemplate(_)));
        let raised = err("{{ raise_exception('only user and assistant roles') }}");
        assert!(raised.to_string().contains("only user and assistant roles"), "{raised}");
        // A template that would run for ever runs out of fuel.
        let looping = err("{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}");
        assert!(matches!(looping, TwinferError::ChatTemplate(_)));
        assert!(matches!(err("{{ messages[0].content.nonexistent_method() }}"), TwinferError::ChatTemplate(_)));
    }
}
