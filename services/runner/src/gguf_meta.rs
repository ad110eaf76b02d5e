//! Typed reads of a GGUF file's metadata, shared by the loader, the
//! tokenizer and the engine: `None` when a key is missing or of another
//! type.

use candle_core::quantized::gguf_file::{Content, Value};

pub fn get_str<'a>(content: &'a Content, key: &str) -> Option<&'a str> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

pub fn get_u32(content: &Content, key: &str) -> Option<u32> {
    content.metadata.get(key).and_then(|v| v.to_u32().ok())
}

pub fn get_f32(content: &Content, key: &str) -> Option<f32> {
    content.metadata.get(key).and_then(|v| v.to_f32().ok())
}

pub fn get_bool(content: &Content, key: &str) -> Option<bool> {
    content.metadata.get(key).and_then(|v| v.to_bool().ok())
}

pub fn get_array<'a>(content: &'a Content, key: &str) -> Option<&'a [Value]> {
    match content.metadata.get(key) {
        Some(Value::Array(values)) => Some(values),
        _ => None,
    }
}

/// An array of strings (elements of another type are skipped).
pub fn get_strings(content: &Content, key: &str) -> Option<Vec<String>> {
    get_array(content, key).map(|values| {
        values
            .iter()
            .filter_map(|v| v.to_string().ok().cloned())
            .collect()
    })
}
