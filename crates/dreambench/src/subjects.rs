//! The 30 DreamBench subjects with their class nouns (`prompts_and_classes.txt`, "Classes")
//! and whether they are live subjects (cats and dogs) or objects; the kind picks the prompt list.

use serde::Serialize;

/// Live subjects get the live prompt list (outfits, hats); objects get the object list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Object,
    Live,
}

/// One DreamBench subject: its folder name and its class noun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Subject {
    /// Folder name in the dataset, e.g. `dog7`; also the subject's id everywhere in this project.
    pub name: &'static str,
    /// Class noun used in prompts, e.g. `dog`, `stuffed animal`.
    pub class: &'static str,
    pub kind: Kind,
}

impl Subject {
    /// The prompt templates (with `{subject}`) of this subject's kind.
    pub fn prompts(&self) -> &'static [&'static str; 25] {
        match self.kind {
            Kind::Object => &crate::prompts::OBJECT_PROMPTS,
            Kind::Live => &crate::prompts::LIVE_PROMPTS,
        }
    }
}

const fn s(name: &'static str, class: &'static str, kind: Kind) -> Subject {
    Subject { name, class, kind }
}

use Kind::{Live, Object};

/// All 30 subjects in the dataset's own (alphabetical) order.
pub const SUBJECTS: [Subject; 30] = [
    s("backpack", "backpack", Object),
    s("backpack_dog", "backpack", Object),
    s("bear_plushie", "stuffed animal", Object),
    s("berry_bowl", "bowl", Object),
    s("can", "can", Object),
    s("candle", "candle", Object),
    s("cat", "cat", Live),
    s("cat2", "cat", Live),
    s("clock", "clock", Object),
    s("colorful_sneaker", "sneaker", Object),
    s("dog", "dog", Live),
    s("dog2", "dog", Live),
    s("dog3", "dog", Live),
    s("dog5", "dog", Live),
    s("dog6", "dog", Live),
    s("dog7", "dog", Live),
    s("dog8", "dog", Live),
    s("duck_toy", "toy", Object),
    s("fancy_boot", "boot", Object),
    s("grey_sloth_plushie", "stuffed animal", Object),
    s("monster_toy", "toy", Object),
    s("pink_sunglasses", "glasses", Object),
    s("poop_emoji", "toy", Object),
    s("rc_car", "toy", Object),
    s("red_cartoon", "cartoon", Object),
    s("robot_toy", "toy", Object),
    s("shiny_sneaker", "sneaker", Object),
    s("teapot", "teapot", Object),
    s("vase", "vase", Object),
    s("wolf_plushie", "stuffed animal", Object),
];

/// Looks a subject up by its folder name.
pub fn subject(name: &str) -> Option<&'static Subject> {
    SUBJECTS.iter().find(|s| s.name == name)
}
