//! Topic Name and Topic Filter rules (MQTT 3.1.1 §4.7, MQTT 5.0 §4.7 and §4.8.2).

use crate::MqttError;

/// Checks a Topic Name as sent in PUBLISH or as a Will Topic: at least one character and
/// no wildcard (`+`, `#`). U+0000 is already excluded by the string rules.
///
/// # Errors
///
/// [`MqttError::TopicName`] when the name is empty or holds a wildcard.
pub fn check_topic_name(name: &str) -> Result<(), MqttError> {
    if name.is_empty() {
        return Err(MqttError::TopicName("empty topic name"));
    }
    if name.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(MqttError::TopicName("wildcard in a topic name"));
    }
    Ok(())
}

/// What a valid Topic Filter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FilterKind {
    /// An ordinary filter.
    Plain,
    /// An MQTT 5 shared subscription, `$share/{ShareName}/{filter}`.
    Shared,
}

/// Checks a Topic Filter: not empty, `#` only as the last level and alone in it, `+` alone
/// in its level; with `shared` (MQTT 5), a `$share/` prefix must carry a non-empty share
/// name without wildcards followed by `/` and a valid filter.
///
/// # Errors
///
/// [`MqttError::TopicFilter`] naming the rule broken.
pub fn check_topic_filter(filter: &str, shared: bool) -> Result<FilterKind, MqttError> {
    let mut kind = FilterKind::Plain;
    let mut rest = filter;
    if shared && let Some(after) = filter.strip_prefix("$share/") {
        let (name, f) = after.split_once('/').ok_or(MqttError::TopicFilter(
            "shared subscription without a filter",
        ))?;
        if name.is_empty() || name.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(MqttError::TopicFilter("invalid share name"));
        }
        rest = f;
        kind = FilterKind::Shared;
    }
    if rest.is_empty() {
        return Err(MqttError::TopicFilter("empty topic filter"));
    }
    let mut levels = rest.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.len() > 1 && level.bytes().any(|b| b == b'+' || b == b'#') {
            return Err(if level.contains('#') {
                MqttError::TopicFilter("'#' not alone in its level")
            } else {
                MqttError::TopicFilter("'+' not alone in its level")
            });
        }
        if level == "#" && levels.peek().is_some() {
            return Err(MqttError::TopicFilter("'#' not the last level"));
        }
    }
    Ok(kind)
}
