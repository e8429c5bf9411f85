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

/// Width of the flat attribute value vocabulary of [`Attributes::labels`]: one slot per value
/// of every field (16 fields, 102 values).
pub const ATTRIBUTE_VALUES: usize = 102;

/// The number of values of each field of [`Attributes::labels`], in order (they sum to
/// [`ATTRIBUTE_VALUES`]).
pub const ATTRIBUTE_FIELDS: &[usize] = &[2, 4, 16, 2, 2, 8, 16, 5, 5, 16, 16, 2, 2, 2, 2, 2];

/// One known attribute as a field of the flat value vocabulary: `start..start + len` is the
/// field, `value` the index of the known value inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldValue {
    pub start: usize,
    pub len: usize,
    pub value: usize,
}

/// Collects the known fields in vocabulary order.
struct Fields {
    next: usize,
    out: Vec<FieldValue>,
}

impl Fields {
    fn enumerated<T: PartialEq + Copy>(&mut self, all: &[T], v: Option<T>) {
        if let Some(value) = v.and_then(|v| all.iter().position(|a| *a == v)) {
            self.out.push(FieldValue {
                start: self.next,
                len: all.len(),
                value,
            });
        }
        self.next += all.len();
    }
    fn flag(&mut self, v: Option<bool>) {
        self.enumerated(&[false, true], v);
    }
}

impl Attributes {
    /// The known attributes as fields of a flat vocabulary of [`ATTRIBUTE_VALUES`] values
    /// (gender, hair length, hair colour, hat, glasses, upper type, upper colour, pattern,
    /// lower type, lower colour, shoe colour, then the five carried items, each yes/no); an
    /// unknown attribute has no entry. A bald head's hair colour is left out, as the captions
    /// leave it out.
    pub fn labels(&self) -> Vec<FieldValue> {
        let mut f = Fields {
            next: 0,
            out: Vec::new(),
        };
        let head = self.head.unwrap_or_default();
        let upper = self.upper.unwrap_or_default();
        let lower = self.lower.unwrap_or_default();
        let shoes = self.shoes.unwrap_or_default();
        let carried = self.belongings.unwrap_or_default();
        f.enumerated(Gender::ALL, self.gender);
        f.enumerated(HairLength::ALL, head.hair_length);
        let bald = head.hair_length == Some(HairLength::Bald);
        f.enumerated(Colour::ALL, head.hair_colour.filter(|_| !bald));
        f.flag(head.hat);
        f.flag(head.glasses);
        f.enumerated(UpperType::ALL, upper.kind);
        f.enumerated(Colour::ALL, upper.colour);
        f.enumerated(Pattern::ALL, upper.pattern);
        f.enumerated(LowerType::ALL, lower.kind);
        f.enumerated(Colour::ALL, lower.colour);
        f.enumerated(Colour::ALL, shoes.colour);
        f.flag(carried.backpack);
        f.flag(carried.handbag);
        f.flag(carried.shoulder_bag);
        f.flag(carried.umbrella);
        f.flag(carried.suitcase);
        debug_assert_eq!(f.next, ATTRIBUTE_VALUES);
        f.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_cover_the_vocabulary_and_skip_unknowns() {
        assert!(Attributes::default().labels().is_empty());
        let all = Attributes {
            gender: Some(Gender::Woman),
            head: Some(Head {
                hair_length: Some(HairLength::Long),
                hair_colour: Some(Colour::Black),
                hat: Some(false),
                glasses: Some(true),
            }),
            upper: Some(Upper {
                kind: Some(UpperType::Jacket),
                colour: Some(Colour::Navy),
                pattern: Some(Pattern::Striped),
            }),
            lower: Some(Lower {
                kind: Some(LowerType::Jeans),
                colour: Some(Colour::Denim),
            }),
            shoes: Some(Shoes {
                colour: Some(Colour::Khaki),
            }),
            belongings: Some(Belongings {
                backpack: Some(true),
                handbag: Some(false),
                shoulder_bag: Some(false),
                umbrella: Some(false),
                suitcase: Some(true),
            }),
        };
        let l = all.labels();
        assert_eq!(l.len(), 16);
        // Fields tile the vocabulary in order, each value inside its field.
        let mut next = 0;
        for f in &l {
            assert_eq!(f.start, next);
            assert!(f.value < f.len);
            next += f.len;
        }
        assert_eq!(next, ATTRIBUTE_VALUES);
        let lens: Vec<usize> = l.iter().map(|f| f.len).collect();
        assert_eq!(lens, ATTRIBUTE_FIELDS);
        assert_eq!(l[0].value, 1); // woman
        assert_eq!(l[6].start, 2 + 4 + 16 + 2 + 2 + 8); // upper colour
        assert_eq!(l[6].value, 3); // navy
        assert_eq!(l[15].value, 1); // suitcase carried
                                    // Unknown fields have no entry but keep the others' places; a bald head has no colour.
        let some = Attributes {
            head: Some(Head {
                hair_length: Some(HairLength::Bald),
                hair_colour: Some(Colour::Grey),
                ..Head::default()
            }),
            shoes: Some(Shoes {
                colour: Some(Colour::Red),
            }),
            ..Attributes::default()
        };
        let l = some.labels();
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].start, l[0].len, l[0].value), (2, 4, 0));
        assert_eq!(l[1].start, 2 + 4 + 16 + 2 + 2 + 8 + 16 + 5 + 5 + 16);
        assert_eq!(l[1].value, 7); // red
    }
}
