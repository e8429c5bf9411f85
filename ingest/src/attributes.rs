//! The attribute schema: SYNTH-PEDES's six groups — gender, head, upper body, lower body, shoes,
//! belongings — with closed vocabularies. On the wire it is a JSON object with one optional key
//! per group; every field inside a group is optional too, and an absent attribute is *unknown*
//! (captions leave it out; nothing is invented). An unknown key or value is refused by serde with
//! a message listing the accepted ones.
//!
//! ```json
//! {"gender": "woman",
//!  "head": {"hair_length": "long", "hair_colour": "black", "hat": false, "glasses": true},
//!  "upper": {"type": "jacket", "colour": "navy", "pattern": "plain"},
//!  "lower": {"type": "jeans", "colour": "denim"},
//!  "shoes": {"colour": "white"},
//!  "belongings": {"backpack": true, "handbag": false}}
//! ```
//!
//! Vocabularies (wire spelling → caption words):
//! - colour: black, white, grey, navy, blue, light_blue ("light blue"), denim ("denim blue"),
//!   red, green, yellow, orange, pink, purple, brown, beige, khaki
//! - gender: man, woman
//! - hair_length: bald, short, medium ("shoulder-length"), long
//! - upper type: t_shirt ("t-shirt"), shirt, sweater, hoodie, jacket, coat, vest, dress
//! - pattern: plain, striped, checked, logo ("printed"), floral
//! - lower type: trousers, jeans, shorts, skirt, leggings
//! - belongings: backpack, handbag, shoulder_bag ("shoulder bag"), umbrella, suitcase

use serde::{Deserialize, Serialize};

macro_rules! vocabulary {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $words:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            /// The words a caption uses for this value.
            pub fn words(self) -> &'static str {
                match self { $($name::$variant => $words),+ }
            }
        }
    };
}

vocabulary!(
    /// Garment, hair and shoe colours.
    Colour {
        Black => "black", White => "white", Grey => "grey", Navy => "navy", Blue => "blue",
        LightBlue => "light blue", Denim => "denim blue", Red => "red", Green => "green",
        Yellow => "yellow", Orange => "orange", Pink => "pink", Purple => "purple",
        Brown => "brown", Beige => "beige", Khaki => "khaki",
    }
);
vocabulary!(
    /// Perceived gender, as SYNTH-PEDES annotates it.
    Gender { Man => "man", Woman => "woman" }
);
vocabulary!(
    /// Hair length.
    HairLength { Bald => "bald", Short => "short", Medium => "shoulder-length", Long => "long" }
);
vocabulary!(
    /// Upper-body garment.
    UpperType {
        TShirt => "t-shirt", Shirt => "shirt", Sweater => "sweater", Hoodie => "hoodie",
        Jacket => "jacket", Coat => "coat", Vest => "vest", Dress => "dress",
    }
);
vocabulary!(
    /// Upper-body garment pattern.
    Pattern { Plain => "plain", Striped => "striped", Checked => "checked", Logo => "printed", Floral => "floral" }
);
vocabulary!(
    /// Lower-body garment.
    LowerType { Trousers => "trousers", Jeans => "jeans", Shorts => "shorts", Skirt => "skirt", Leggings => "leggings" }
);

/// Head: hair, hat, glasses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// Hair length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hair_length: Option<HairLength>,
    /// Hair colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hair_colour: Option<Colour>,
    /// Wears a hat or cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hat: Option<bool>,
    /// Wears glasses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub glasses: Option<bool>,
}

/// Upper body: garment type, colour, pattern.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upper {
    /// Garment type.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<UpperType>,
    /// Main colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<Colour>,
    /// Pattern.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<Pattern>,
}

/// Lower body: garment type and colour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lower {
    /// Garment type.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<LowerType>,
    /// Main colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<Colour>,
}

/// Shoes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shoes {
    /// Main colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub colour: Option<Colour>,
}

/// What the person carries; each item present (true), absent (false) or unknown (missing).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Belongings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backpack: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handbag: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shoulder_bag: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub umbrella: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suitcase: Option<bool>,
}

impl Belongings {
    /// The items known to be carried, with their caption words.
    pub fn carried(&self) -> Vec<&'static str> {
        [
            (self.backpack, "backpack"),
            (self.handbag, "handbag"),
            (self.shoulder_bag, "shoulder bag"),
            (self.umbrella, "umbrella"),
            (self.suitcase, "suitcase"),
        ]
        .into_iter()
        .filter(|(v, _)| *v == Some(true))
        .map(|(_, w)| w)
        .collect()
    }
}

/// A person's attributes: one optional entry per SYNTH-PEDES group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attributes {
    /// Gender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gender: Option<Gender>,
    /// Hair, hat, glasses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<Head>,
    /// Upper-body garment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<Upper>,
    /// Lower-body garment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lower: Option<Lower>,
    /// Shoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shoes: Option<Shoes>,
    /// Carried items.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub belongings: Option<Belongings>,
}

impl Attributes {
    /// True when nothing at all is known.
    pub fn is_empty(&self) -> bool {
        *self == Attributes::default()
    }
}
