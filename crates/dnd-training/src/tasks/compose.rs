//! The compositional suite: every task asks for one field of a short purchase record ("On
//! Friday, Maya bought 3 red kettles in Lima for $45.") in one answer form (bare, upper case,
//! in parentheses, in double quotes, after `Answer: `). Its system prompts say both parts, so a
//! combination held out of training while its field and its form are each trained with other
//! partners asks the generator to read an instruction made of parts it knows, the test the
//! parametric suite ([`super::param_tasks`]) cannot make: there a held-out task differs from a
//! trained one in a value, here in how two trained parts go together.
//!
//! Tasks are named `FIELD_FORM` (`city_upper`); the family is the form. Upper case leaves the
//! digits of `count` and `price` unchanged, so those two combinations are left out: 33 tasks.
//!
//! [`HELD_OUT`] is the holdout of the first experiment on this suite, fixed before any run: one
//! combination per field, none in the bare form (the skill suite's extract_name, extract_color
//! and extract_day are those in all but name), each other form at least once.

use rand::rngs::StdRng;
use rand::Rng;

use super::{pick, TaskSpec, CITIES, COLORS, NAMES, NOUNS, WEEKDAYS};

/// One purchase: the fields a task may ask for.
struct Record {
    day: &'static str,
    name: &'static str,
    count: u32,
    color: &'static str,
    item: &'static str,
    city: &'static str,
    price: u32,
}

impl Record {
    fn draw(rng: &mut StdRng) -> Self {
        Self {
            day: pick(rng, WEEKDAYS),
            name: pick(rng, NAMES),
            count: rng.random_range(2..=9),
            color: pick(rng, COLORS),
            item: pick(rng, NOUNS),
            city: pick(rng, CITIES),
            price: rng.random_range(5..1000),
        }
    }

    /// The record as a sentence, in one of four orders (so that no field has a fixed place).
    fn sentence(&self, rng: &mut StdRng) -> String {
        let Self {
            day,
            name,
            count,
            color,
            item,
            city,
            price,
        } = self;
        match rng.random_range(0..4) {
            0 => format!("On {day}, {name} bought {count} {color} {item}s in {city} for ${price}."),
            1 => format!("{name} paid ${price} for {count} {color} {item}s in {city} on {day}."),
            2 => format!("In {city} on {day}, {count} {color} {item}s cost {name} ${price}."),
            _ => format!("For ${price}, {name} got {count} {color} {item}s in {city} last {day}."),
        }
    }
}

/// A field: task-name part, three ways to say it (train, train, test), and its value.
struct Field {
    name: &'static str,
    said: [&'static str; 3],
    value: fn(&Record) -> String,
}

/// An answer form: task-name part (and family), three ways to say it, and how it shapes a value.
struct Form {
    name: &'static str,
    said: [&'static str; 3],
    shape: fn(&str) -> String,
}

const FIELDS: [Field; 7] = [
    Field {
        name: "name",
        said: ["person's name", "name of the buyer", "buyer"],
        value: |r| r.name.into(),
    },
    Field {
        name: "city",
        said: ["city", "town", "place"],
        value: |r| r.city.into(),
    },
    Field {
        name: "day",
        said: ["weekday", "day of the week", "day"],
        value: |r| r.day.into(),
    },
    Field {
        name: "color",
        said: ["colour of the items", "colour", "colour word"],
        value: |r| r.color.into(),
    },
    Field {
        name: "item",
        said: [
            "item bought (in the singular)",
            "singular name of what was bought",
            "thing purchased, singular",
        ],
        value: |r| r.item.into(),
    },
    Field {
        name: "count",
        said: ["number of items", "quantity bought", "how many were bought"],
        value: |r| r.count.to_string(),
    },
    Field {
        name: "price",
        said: [
            "price with its $ sign",
            "dollar amount paid (with the $)",
            "cost, $ included",
        ],
        value: |r| format!("${}", r.price),
    },
];

const FORMS: [Form; 5] = [
    Form {
        name: "plain",
        said: ["as it is written", "exactly as in the text", "unchanged"],
        shape: |v| v.to_string(),
    },
    Form {
        name: "upper",
        said: ["in upper case", "in capital letters", "all in uppercase"],
        shape: |v| v.to_uppercase(),
    },
    Form {
        name: "paren",
        said: [
            "in parentheses",
            "wrapped in ( and )",
            "between round brackets",
        ],
        shape: |v| format!("({v})"),
    },
    Form {
        name: "quote",
        said: [
            "in double quotes",
            "wrapped in quotation marks",
            "between double quotation marks",
        ],
        shape: |v| format!("\"{v}\""),
    },
    Form {
        name: "prefix",
        said: [
            "after the words 'Answer: '",
            "prefixed with 'Answer: '",
            "starting with 'Answer: '",
        ],
        shape: |v| format!("Answer: {v}"),
    },
];

/// The combinations held out of training in the first experiment on this suite: field `i`
/// (in [`FIELDS`] order) with form `1 + i mod 4` (upper, paren, quote, prefix), which never
/// meets the two missing upper-case combinations.
pub const HELD_OUT: [&str; 7] = [
    "name_upper",
    "city_paren",
    "day_quote",
    "color_prefix",
    "item_upper",
    "count_paren",
    "price_quote",
];

/// Every task of the suite, fields outer and forms inner, without `count_upper` and
/// `price_upper`.
pub fn compose_tasks() -> Vec<TaskSpec> {
    let mut tasks = Vec::new();
    for field in &FIELDS {
        for form in &FORMS {
            if form.name == "upper" && matches!(field.name, "count" | "price") {
                continue;
            }
            let [f0, f1, f2] = field.said;
            let [g0, g1, g2] = form.said;
            let (value, shape) = (field.value, form.shape);
            tasks.push(TaskSpec {
                name: format!("{}_{}", field.name, form.name),
                family: form.name,
                systems: [
                    format!("Reply with the {f0} from the sentence, {g0}."),
                    format!("Give the {f1} mentioned in the text {g1}, and nothing else."),
                    format!("What is the {f2} in this record? Answer {g2}."),
                ],
                make: Box::new(move |r| {
                    let record = Record::draw(r);
                    (record.sentence(r), shape(&value(&record)))
                }),
            });
        }
    }
    tasks
}
