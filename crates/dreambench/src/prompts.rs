//! The two DreamBench prompt lists and per-method prompt rendering.
//!
//! A prompt template holds `{subject}`; a [`PromptStyle`] says what `{subject}` becomes for a
//! method, itself a template over `{identifier}`, `{class}` and `{token}`:
//! Stable Diffusion `{class}` → `a dog in the jungle`; DreamBooth `{identifier} {class}` →
//! `a sks dog in the jungle`; Textual Inversion `{token} {class}` or `{token}`.
//! CLIP-T always scores against the `{class}` rendering.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Object prompts, in the order of `prompts_and_classes.txt` (prompt index 0..25).
pub const OBJECT_PROMPTS: [&str; 25] = [
    "a {subject} in the jungle",
    "a {subject} in the snow",
    "a {subject} on the beach",
    "a {subject} on a cobblestone street",
    "a {subject} on top of pink fabric",
    "a {subject} on top of a wooden floor",
    "a {subject} with a city in the background",
    "a {subject} with a mountain in the background",
    "a {subject} with a blue house in the background",
    "a {subject} on top of a purple rug in a forest",
    "a {subject} with a wheat field in the background",
    "a {subject} with a tree and autumn leaves in the background",
    "a {subject} with the Eiffel Tower in the background",
    "a {subject} floating on top of water",
    "a {subject} floating in an ocean of milk",
    "a {subject} on top of green grass with sunflowers around it",
    "a {subject} on top of a mirror",
    "a {subject} on top of the sidewalk in a crowded street",
    "a {subject} on top of a dirt road",
    "a {subject} on top of a white rug",
    "a red {subject}",
    "a purple {subject}",
    "a shiny {subject}",
    "a wet {subject}",
    "a cube shaped {subject}",
];

/// Live-subject prompts, in the order of `prompts_and_classes.txt` (prompt index 0..25).
pub const LIVE_PROMPTS: [&str; 25] = [
    "a {subject} in the jungle",
    "a {subject} in the snow",
    "a {subject} on the beach",
    "a {subject} on a cobblestone street",
    "a {subject} on top of pink fabric",
    "a {subject} on top of a wooden floor",
    "a {subject} with a city in the background",
    "a {subject} with a mountain in the background",
    "a {subject} with a blue house in the background",
    "a {subject} on top of a purple rug in a forest",
    "a {subject} wearing a red hat",
    "a {subject} wearing a santa hat",
    "a {subject} wearing a rainbow scarf",
    "a {subject} wearing a black top hat and a monocle",
    "a {subject} in a chef outfit",
    "a {subject} in a firefighter outfit",
    "a {subject} in a police outfit",
    "a {subject} wearing pink glasses",
    "a {subject} wearing a yellow shirt",
    "a {subject} in a purple wizard outfit",
    "a red {subject}",
    "a purple {subject}",
    "a shiny {subject}",
    "a wet {subject}",
    "a cube shaped {subject}",
];

/// How a method names the subject inside a prompt.
///
/// `subject` is a template over `{identifier}`, `{class}` and `{token}`; the values fill it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptStyle {
    /// Template for the subject phrase, e.g. `{identifier} {class}`.
    pub subject: String,
    /// Rare-token identifier (DreamBooth's `sks`).
    #[serde(default = "default_identifier")]
    pub identifier: String,
    /// Learned pseudo-word (Textual Inversion's `<dog7>`); `{token}` in `subject`.
    #[serde(default)]
    pub token: Option<String>,
}

fn default_identifier() -> String {
    "sks".to_string()
}

/// A template that names a placeholder it has no value for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("prompt template '{template}' uses {{{placeholder}}} but no value was given for it")]
pub struct RenderError {
    pub template: String,
    pub placeholder: String,
}

impl PromptStyle {
    /// Vanilla Stable Diffusion: the class noun alone (identifier dropped). Also the CLIP-T style.
    pub fn class_only() -> Self {
        Self {
            subject: "{class}".into(),
            identifier: default_identifier(),
            token: None,
        }
    }

    /// DreamBooth: `{identifier} {class}` with the given identifier (`sks` by default).
    pub fn dreambooth(identifier: &str) -> Self {
        Self {
            subject: "{identifier} {class}".into(),
            identifier: identifier.into(),
            token: None,
        }
    }

    /// Textual Inversion: `subject` is `{token} {class}` or `{token}`.
    pub fn textual_inversion(token: &str, with_class: bool) -> Self {
        let subject = if with_class {
            "{token} {class}"
        } else {
            "{token}"
        };
        Self {
            subject: subject.into(),
            identifier: default_identifier(),
            token: Some(token.into()),
        }
    }

    /// The subject phrase for a class noun, e.g. `sks dog`.
    pub fn subject_phrase(&self, class: &str) -> Result<String, RenderError> {
        fill(
            &self.subject,
            &[
                ("identifier", Some(self.identifier.as_str())),
                ("class", Some(class)),
                ("token", self.token.as_deref()),
            ],
        )
    }

    /// Renders a prompt template (with `{subject}`) for a class noun.
    pub fn render(&self, prompt_template: &str, class: &str) -> Result<String, RenderError> {
        let phrase = self.subject_phrase(class)?;
        fill(prompt_template, &[("subject", Some(phrase.as_str()))])
    }

    /// The words this style adds that the class-only prompt lacks (the identifier or the token),
    /// in order: removing them from a rendered prompt gives the template prompt.
    pub fn added_words(&self, class: &str) -> Result<Vec<String>, RenderError> {
        let phrase = self.subject_phrase(class)?;
        let class_words: Vec<&str> = class.split_whitespace().collect();
        Ok(phrase
            .split_whitespace()
            .filter(|w| !class_words.contains(w))
            .map(str::to_string)
            .collect())
    }
}

/// The CLIP-T prompt: the class noun and no identifier (`a dog in the jungle`).
pub fn clip_t_prompt(prompt_template: &str, class: &str) -> String {
    PromptStyle::class_only()
        .render(prompt_template, class)
        .expect("the class-only style names only {class}")
}

/// Replaces `{name}` placeholders; an unknown placeholder or a missing value is an error, so a
/// typo in a config never silently produces a prompt with braces in it.
fn fill(template: &str, values: &[(&str, Option<&str>)]) -> Result<String, RenderError> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after.find('}').ok_or_else(|| RenderError {
            template: template.into(),
            placeholder: after.to_string(),
        })?;
        let name = &after[..close];
        let value = values
            .iter()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| *v);
        match value {
            Some(v) => out.push_str(v),
            None => {
                return Err(RenderError {
                    template: template.into(),
                    placeholder: name.into(),
                })
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

impl fmt::Display for PromptStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.subject)
    }
}
