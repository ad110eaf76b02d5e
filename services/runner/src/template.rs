//! The model's own chat template (`tokenizer.chat_template` in the GGUF),
//! rendered with minijinja; ChatML when the model has none.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Debug)]
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos: String,
    eos: String,
}

#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct TemplateError(String);

impl ChatTemplate {
    pub fn new(source: Option<String>, bos: String, eos: String) -> Result<Self, TemplateError> {
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source.unwrap_or_else(|| CHATML.to_string()))
            .map_err(|e| TemplateError(e.to_string()))?;
        Ok(Self { env, bos, eos })
    }

    /// The prompt for `messages`, ending where the assistant's turn begins.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        self.render_with(messages, true)
    }

    /// The prompt for `messages`; with `add_generation_prompt`, ending
    /// where the assistant's turn begins.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let template = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            })
            .map_err(|e| TemplateError(e.to_string()))
    }

    /// The prompt for `messages` with the last one (the assistant's
    /// partial answer) left open, so that generation continues it: the
    /// whole conversation rendered, cut after the last message's text, as
    /// Hugging Face's and vLLM's `continue_final_message` do.
    pub fn render_continuing(&self, messages: &[ChatMessage]) -> Result<String, TemplateError> {
        let Some(last) = messages.last() else {
            return Err(TemplateError("no message to continue".into()));
        };
        let rendered = self.render_with(messages, false)?;
        let partial = last.content.trim_end();
        if partial.is_empty() {
            // Nothing written to find: the assistant's turn just begins.
            return self.render(&messages[..messages.len() - 1]);
        }
        match rendered.rfind(partial) {
            Some(at) => Ok(rendered[..at + partial.len()].to_string()),
            None => Err(TemplateError(
                "the template does not write the final message's text as given".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_places_each_turn() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        let text = t
            .render(&[
                ChatMessage {
                    role: "system".into(),
                    content: "Be brief.".into(),
                },
                ChatMessage {
                    role: "user".into(),
                    content: "Hi".into(),
                },
            ])
            .unwrap();
        assert_eq!(
            text,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn a_continued_final_message_is_left_open() {
        let t = ChatTemplate::new(None, String::new(), String::new()).unwrap();
        let turn = |role: &str, content: &str| ChatMessage {
            role: role.into(),
            content: content.into(),
        };
        let open = t
            .render_continuing(&[turn("user", "Hi"), turn("assistant", "Hello, how ")])
            .unwrap();
        assert_eq!(
            open,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello, how"
        );
        let empty = t
            .render_continuing(&[turn("user", "Hi"), turn("assistant", "")])
            .unwrap();
        assert_eq!(
            empty,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
