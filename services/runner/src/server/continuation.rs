//! Continuing a completion another replica began, so that a gateway can
//! move a request whose replica died mid-answer.
//!
//! Chat requests take vLLM's `continue_final_message: true` (with
//! `add_generation_prompt` false or absent) and a final `assistant`
//! message holding the partial answer: the template is rendered with that
//! message left open and generation continues it, text only. For an exact
//! continuation the extension `continue_token_ids` also gives the tokens
//! already generated: the prompt is then the conversation before the final
//! message, rendered as the original request was, followed by those
//! tokens, and the final message's text must be what the client has of
//! them. `/v1/completions` takes `continue_token_ids` with `continue_text`
//! (the text the client has; all of the tokens' text when absent).
//!
//! The decisions here are pure: [`chat_plan`] reads the fields, [`resume`]
//! checks the tokens against the vocabulary and the text.

use serde::Deserialize;

use crate::engine::Resume;
use crate::tokenizer::Tokenizer;

/// The continuation fields of a request body.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ContinueFields {
    #[serde(default)]
    pub continue_final_message: bool,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub continue_token_ids: Option<Vec<u32>>,
    #[serde(default)]
    pub continue_text: Option<String>,
}

/// A refused field: its name and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Invalid {
    pub param: String,
    pub message: String,
}

fn invalid(param: &str, message: impl Into<String>) -> Invalid {
    Invalid {
        param: param.into(),
        message: message.into(),
    }
}

/// How a chat request's prompt is made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChatPlan {
    /// A new answer (or, without the generation prompt, whatever follows
    /// the conversation).
    Answer { add_generation_prompt: bool },
    /// The final assistant message continued from its text.
    ContinueText,
    /// The final assistant message continued from these tokens.
    ContinueTokens(Vec<u32>),
}

/// Reads the continuation fields of a chat request whose messages have
/// `roles`.
pub(super) fn chat_plan(fields: ContinueFields, roles: &[&str]) -> Result<ChatPlan, Invalid> {
    if fields.continue_text.is_some() {
        return Err(invalid(
            "continue_text",
            "continue_text is for /v1/completions; a chat request continues its final assistant message",
        ));
    }
    if !fields.continue_final_message {
        return match fields.continue_token_ids {
            Some(_) => Err(invalid(
                "continue_token_ids",
                "continue_token_ids needs continue_final_message: true",
            )),
            None => Ok(ChatPlan::Answer {
                add_generation_prompt: fields.add_generation_prompt.unwrap_or(true),
            }),
        };
    }
    if fields.add_generation_prompt == Some(true) {
        return Err(invalid(
            "add_generation_prompt",
            "continue_final_message and add_generation_prompt cannot both be true",
        ));
    }
    let last = roles.len().saturating_sub(1);
    if roles.last() != Some(&"assistant") {
        return Err(invalid(
            &format!("messages[{last}].role"),
            "continue_final_message needs a final assistant message to continue",
        ));
    }
    if roles.len() < 2 && fields.continue_token_ids.is_some() {
        return Err(invalid(
            "messages",
            "continue_token_ids continues an answer to at least one message",
        ));
    }
    Ok(match fields.continue_token_ids {
        Some(ids) => ChatPlan::ContinueTokens(ids),
        None => ChatPlan::ContinueText,
    })
}

/// The resume point of `generated` when the client has `sent` of their
/// text (all of it when `None`): every id must be in the vocabulary, and
/// `sent` must begin the tokens' streamed text. `param` names the field
/// that carried the text.
pub(super) fn resume(
    tokenizer: &Tokenizer,
    generated: Vec<u32>,
    sent: Option<&str>,
    param: &str,
) -> Result<Resume, Invalid> {
    let vocab = tokenizer.vocab_size();
    if let Some((i, id)) = generated
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(invalid(
            &format!("continue_token_ids[{i}]"),
            format!("token id {id} is outside the vocabulary of {vocab}"),
        ));
    }
    let (text, _) = tokenizer.streamed(&generated);
    let sent = match sent {
        None => text.len(),
        Some(s) if text.starts_with(s) => s.len(),
        Some(_) => {
            return Err(invalid(
                param,
                "the text already sent is not the beginning of continue_token_ids' text",
            ));
        }
    };
    Ok(Resume { generated, sent })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(
        continue_final_message: bool,
        add_generation_prompt: Option<bool>,
        ids: Option<Vec<u32>>,
    ) -> ContinueFields {
        ContinueFields {
            continue_final_message,
            add_generation_prompt,
            continue_token_ids: ids,
            continue_text: None,
        }
    }

    /// (what, fields, roles, the plan or the refused param)
    type PlanCase = (
        &'static str,
        ContinueFields,
        &'static [&'static str],
        Result<ChatPlan, &'static str>,
    );

    #[test]
    fn chat_continuation_fields_are_read_and_refused_by_name() {
        const UA: &[&str] = &["user", "assistant"];
        let cases: Vec<PlanCase> = vec![
            (
                "a plain request",
                fields(false, None, None),
                &["user"],
                Ok(ChatPlan::Answer {
                    add_generation_prompt: true,
                }),
            ),
            (
                "no generation prompt",
                fields(false, Some(false), None),
                &["user"],
                Ok(ChatPlan::Answer {
                    add_generation_prompt: false,
                }),
            ),
            (
                "continue by text",
                fields(true, Some(false), None),
                UA,
                Ok(ChatPlan::ContinueText),
            ),
            (
                "continue by tokens",
                fields(true, None, Some(vec![1, 2])),
                UA,
                Ok(ChatPlan::ContinueTokens(vec![1, 2])),
            ),
            (
                "both flags",
                fields(true, Some(true), None),
                UA,
                Err("add_generation_prompt"),
            ),
            (
                "the final message is the user's",
                fields(true, None, None),
                &["user"],
                Err("messages[0].role"),
            ),
            (
                "tokens without continuing",
                fields(false, None, Some(vec![1])),
                UA,
                Err("continue_token_ids"),
            ),
            (
                "tokens with nothing before the answer",
                fields(true, None, Some(vec![1])),
                &["assistant"],
                Err("messages"),
            ),
            (
                "completion text on a chat",
                ContinueFields {
                    continue_text: Some("x".into()),
                    ..fields(true, None, None)
                },
                UA,
                Err("continue_text"),
            ),
        ];
        for (what, fields, roles, expected) in cases {
            let got = chat_plan(fields, roles).map_err(|e| e.param);
            assert_eq!(got, expected.map_err(String::from), "{what}");
        }
    }
}
