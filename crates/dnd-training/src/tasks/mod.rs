//! Seeded task families for skill experiments: tasks whose answers a LoRA can teach a small
//! model (answer formats, label spaces, extraction from the prompt, short arithmetic), unlike
//! the common-sense tasks of the paper, which the models here cannot learn.
//!
//! Each task has three paraphrased system prompts and an example generator; [`write_tasks`]
//! writes `NAME_train.json` (system prompts 1 and 2, alternating) and `NAME_test.json` (the
//! third, unseen paraphrase; prompts never seen in training) in the task-file format of
//! `collect` and `eval`, plus `tasks.json`, the list of tasks with their family and prompts.
//! Choice tasks answer with a bracketed label (scored by the choice rule), the others with
//! plain text (scored by exact match; see [`super::eval::is_correct`]). Everything follows
//! from the seed.

use std::collections::HashSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use super::data::Example;
use dnd_core::error::{DndError, Result};

mod compose;
mod params;
mod wordings;
pub use compose::{compose_tasks, HELD_OUT as COMPOSE_HELD_OUT};
pub use params::param_tasks;

/// A set of tasks `dnd tasks` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Suite {
    /// The skill tasks of four families ([`all_tasks`]).
    #[default]
    Skills,
    /// Templates instantiated with many parameter values ([`param_tasks`]).
    Params,
    /// One field of a record in one answer form, every pairing ([`compose_tasks`]).
    Compose,
}

impl Suite {
    /// The suite's tasks, in their fixed order.
    pub fn tasks(self) -> Vec<TaskSpec> {
        match self {
            Self::Skills => all_tasks(),
            Self::Params => param_tasks(),
            Self::Compose => compose_tasks(),
        }
    }
}

const NOUNS: &[&str] = &[
    "apple", "river", "garden", "window", "teacher", "bicycle", "candle", "mountain", "letter",
    "pencil", "kitchen", "forest", "doctor", "bottle", "market", "camera", "violin", "island",
    "ladder", "basket", "rocket", "pillow", "castle", "jacket", "engine", "mirror", "farmer",
    "tunnel", "planet", "helmet",
];
const ADJECTIVES: &[&str] = &[
    "quiet", "bright", "heavy", "small", "ancient", "curious", "gentle", "narrow", "rapid",
    "golden", "hollow", "silver", "sudden", "tiny", "wooden", "frozen", "humble", "noisy",
    "purple", "steady",
];
const NAMES: &[&str] = &[
    "Alice", "Bruno", "Chloe", "Daniel", "Elena", "Farid", "Grace", "Hiro", "Ingrid", "Jonas",
    "Keiko", "Liam", "Maya", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tara",
];
const CITIES: &[&str] = &[
    "Paris", "Lagos", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dublin", "Hanoi", "Madrid",
    "Nairobi", "Seoul", "Vienna", "Toronto", "Manila", "Athens", "Denver", "Mumbai",
];
const COLORS: &[&str] = &[
    "red", "blue", "green", "yellow", "orange", "purple", "black", "white", "brown", "pink",
];
const WEEKDAYS: &[&str] = &[
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];
const ANIMALS: &[&str] = &[
    "cat", "horse", "rabbit", "parrot", "turtle", "goat", "otter", "fox", "owl", "dolphin",
];
const GOOD: &[&str] = &[
    "wonderful",
    "excellent",
    "delightful",
    "fantastic",
    "superb",
    "lovely",
    "brilliant",
    "charming",
];
const BAD: &[&str] = &[
    "terrible",
    "awful",
    "dreadful",
    "boring",
    "disappointing",
    "horrible",
    "dull",
    "annoying",
];
const REVIEWED: &[&str] = &[
    "movie", "meal", "concert", "hotel", "book", "game", "show", "trip", "service", "album",
];
const SPORT: &[&str] = &[
    "The striker scored twice in the second half",
    "She won the marathon in record time",
    "The team lost the final on penalties",
    "He served three aces in the last set",
    "The coach benched the goalkeeper",
    "The relay runners dropped the baton",
];
const FOOD: &[&str] = &[
    "The soup needs more salt and pepper",
    "He baked a loaf of sourdough bread",
    "The curry was simmered for hours",
    "She sliced the tomatoes for the salad",
    "The pastry chef glazed the tart",
    "They grilled fish over the coals",
];
const TECH: &[&str] = &[
    "The laptop crashed after the update",
    "She wrote a script to parse the logs",
    "The new phone has a faster chip",
    "The server rebooted during the backup",
    "He soldered the wires onto the board",
    "The app stores its data in the cloud",
];

/// Draws one `(prompt, response)` of a task.
pub type MakeExample = Box<dyn Fn(&mut StdRng) -> (String, String) + Send + Sync>;

/// One task: its name, family, three paraphrased system prompts and example generator.
pub struct TaskSpec {
    /// File-name stem.
    pub name: String,
    /// Family (format, classify, extract, arith).
    pub family: &'static str,
    /// Paraphrased system prompts: the first two train, the third tests.
    pub systems: [String; 3],
    make: MakeExample,
}

impl TaskSpec {
    /// One `(prompt, response)`.
    pub fn example(&self, rng: &mut StdRng) -> (String, String) {
        (self.make)(rng)
    }
}

fn pick<'a>(rng: &mut StdRng, words: &[&'a str]) -> &'a str {
    words.choose(rng).expect("a non-empty list")
}

fn phrase(rng: &mut StdRng) -> String {
    let n = rng.random_range(3..=5);
    (0..n)
        .map(|i| {
            if i % 2 == 0 {
                pick(rng, ADJECTIVES)
            } else {
                pick(rng, NOUNS)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn review(rng: &mut StdRng) -> (String, bool) {
    let good = rng.random_bool(0.5);
    let adj = pick(rng, if good { GOOD } else { BAD });
    let thing = pick(rng, REVIEWED);
    let text = match rng.random_range(0..6) {
        0 => format!("The {thing} was {adj}."),
        1 => format!("What a {adj} {thing}, honestly."),
        2 => format!("I found the {thing} {adj} from start to finish."),
        3 => format!("Our {thing} last night? {adj}."),
        4 => format!("My friends all agreed the {thing} was {adj}."),
        _ => format!("A {adj} {thing}, nothing more to say."),
    };
    (text, good)
}

/// A sport, food or tech sentence and its label among `labels` (in that order).
fn topic_sentence(rng: &mut StdRng, labels: [&'static str; 3]) -> (&'static str, &'static str) {
    let (list, label) = match rng.random_range(0..3) {
        0 => (SPORT, labels[0]),
        1 => (FOOD, labels[1]),
        _ => (TECH, labels[2]),
    };
    (pick(rng, list), label)
}

/// Two different numbers below 1000 (the comparison tasks' operands).
fn distinct_pair(rng: &mut StdRng) -> (u32, u32) {
    let a: u32 = rng.random_range(0..1000);
    let mut b: u32 = rng.random_range(0..1000);
    if b == a {
        b = (a + 1) % 1000;
    }
    (a, b)
}

fn rng_bool(rng: &mut StdRng) -> bool {
    rng.random_bool(0.5)
}

fn capitalise(word: &str) -> String {
    let mut c = word.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn yes_no(b: bool) -> String {
    if b { "[yes]" } else { "[no]" }.to_string()
}

/// How many of [`all_tasks`] (the first ones) the shipped skills generator was trained on.
pub const SHIPPED_TASKS: usize = 48;

/// Every task, in a fixed order.
pub fn all_tasks() -> Vec<TaskSpec> {
    vec![
        TaskSpec {
            name: "upper_case".into(),
            family: "format",
            systems: [
                "Rewrite the user's text in capital letters only.".into(),
                "Answer with the same text, written entirely in upper case.".into(),
                "Convert the text you are given to uppercase and reply with nothing else.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                (p.clone(), p.to_uppercase())
            }),
        },
        TaskSpec {
            name: "reverse_words".into(),
            family: "format",
            systems: [
                "Reply with the user's words in reverse order.".into(),
                "Say the same words back, last word first.".into(),
                "Reverse the order of the words you are given.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let rev = p.split(' ').rev().collect::<Vec<_>>().join(" ");
                (p, rev)
            }),
        },
        TaskSpec {
            name: "json_word".into(),
            family: "format",
            systems: [
                "Return the given word as a JSON object with the key \"word\".".into(),
                "Answer in JSON: an object whose only key, \"word\", holds the word.".into(),
                "Wrap the word in a JSON object under the key \"word\".".into(),
            ],
            make: Box::new(|r| {
                let w = pick(r, NOUNS);
                let n = r.random_range(1..100);
                (format!("{w}{n}"), format!("{{\"word\": \"{w}{n}\"}}"))
            }),
        },
        TaskSpec {
            name: "first_letters".into(),
            family: "format",
            systems: [
                "Reply with the first letter of each word, joined together.".into(),
                "Give the initials of the words, with no spaces.".into(),
                "Write only the first letters of the words, one after another.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let s: String = p.split(' ').filter_map(|w| w.chars().next()).collect();
                (p, s)
            }),
        },
        TaskSpec {
            name: "count_words".into(),
            family: "format",
            systems: [
                "Count the words in the user's text and reply with the number.".into(),
                "How many words does the text have? Answer with digits only.".into(),
                "Reply with the number of words in the message.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let n = p.split(' ').count();
                (p, n.to_string())
            }),
        },
        TaskSpec {
            name: "sentiment".into(),
            family: "classify",
            systems: [
                "Classify the review as [positive] or [negative].".into(),
                "Is this review [positive] or [negative]? Answer with the bracketed label.".into(),
                "Label the sentiment of the text: [positive] or [negative].".into(),
            ],
            make: Box::new(|r| {
                let (t, good) = review(r);
                (t, if good { "[positive]" } else { "[negative]" }.into())
            }),
        },
        TaskSpec {
            name: "sentiment_good_bad".into(),
            family: "classify",
            systems: [
                "Say whether the opinion is [good] or [bad].".into(),
                "Answer [good] if the speaker liked it and [bad] if not.".into(),
                "Rate the text as [good] or [bad].".into(),
            ],
            make: Box::new(|r| {
                let (t, good) = review(r);
                (t, if good { "[good]" } else { "[bad]" }.into())
            }),
        },
        TaskSpec {
            name: "topic".into(),
            family: "classify",
            systems: [
                "Name the topic of the sentence: [sport], [food] or [tech].".into(),
                "Which topic is this, [sport], [food] or [tech]?".into(),
                "Classify the sentence into [sport], [food] or [tech].".into(),
            ],
            make: Box::new(|r| {
                let (s, label) = topic_sentence(r, ["[sport]", "[food]", "[tech]"]);
                let name = pick(r, NAMES);
                let when = pick(r, &["", " yesterday", " this morning", " again"]);
                (format!("{name} said{when}: {s}."), label.into())
            }),
        },
        TaskSpec {
            name: "parity".into(),
            family: "classify",
            systems: [
                "Answer [yes] if the number is even and [no] if it is odd.".into(),
                "Is the number even? Reply [yes] or [no].".into(),
                "Tell whether the given number is even: [yes] or [no].".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(0..1000);
                (n.to_string(), yes_no(n.is_multiple_of(2)))
            }),
        },
        TaskSpec {
            name: "greater".into(),
            family: "classify",
            systems: [
                "Is the first number larger than the second? Answer [yes] or [no].".into(),
                "Reply [yes] when the first number is the bigger one, else [no].".into(),
                "Compare the two numbers: [yes] if the first is greater, [no] otherwise.".into(),
            ],
            make: Box::new(|r| {
                let (a, b) = distinct_pair(r);
                (format!("{a} and {b}"), yes_no(a > b))
            }),
        },
        TaskSpec {
            name: "extract_number".into(),
            family: "extract",
            systems: [
                "Reply with the number mentioned in the text.".into(),
                "Which number appears in the sentence? Answer with digits only.".into(),
                "Extract the quantity from the text and reply with it alone.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(2..500);
                let (name, noun) = (pick(r, NAMES), pick(r, NOUNS));
                (
                    format!("{name} bought {n} {noun}s at the market."),
                    n.to_string(),
                )
            }),
        },
        TaskSpec {
            name: "extract_destination".into(),
            family: "extract",
            systems: [
                "Reply with the city the person travelled to.".into(),
                "Where did the traveller go? Answer with the city name only.".into(),
                "Name the destination city of the trip.".into(),
            ],
            make: Box::new(|r| {
                let name = pick(r, NAMES);
                let from = pick(r, CITIES);
                let mut to = pick(r, CITIES);
                while to == from {
                    to = pick(r, CITIES);
                }
                (
                    format!("{name} flew from {from} to {to} last week."),
                    to.into(),
                )
            }),
        },
        TaskSpec {
            name: "extract_name".into(),
            family: "extract",
            systems: [
                "Reply with the name of the person in the text.".into(),
                "Who is mentioned? Answer with the name only.".into(),
                "Extract the person's name from the sentence.".into(),
            ],
            make: Box::new(|r| {
                let (name, adj, noun) = (pick(r, NAMES), pick(r, ADJECTIVES), pick(r, NOUNS));
                (
                    format!("Yesterday a {adj} {noun} was found by {name} near the station."),
                    name.into(),
                )
            }),
        },
        TaskSpec {
            name: "extract_color".into(),
            family: "extract",
            systems: [
                "Reply with the colour named in the text.".into(),
                "Which colour is mentioned? Answer with that word only.".into(),
                "Extract the colour word from the sentence.".into(),
            ],
            make: Box::new(|r| {
                let (noun, color, adj) = (pick(r, NOUNS), pick(r, COLORS), pick(r, ADJECTIVES));
                (
                    format!("The {adj} {noun} was painted {color}."),
                    color.into(),
                )
            }),
        },
        TaskSpec {
            name: "extract_email".into(),
            family: "extract",
            systems: [
                "Reply with the email address in the text.".into(),
                "What is the email address? Answer with it alone.".into(),
                "Extract the contact email from the message.".into(),
            ],
            make: Box::new(|r| {
                let name = pick(r, NAMES);
                let email = format!(
                    "{}.{}@{}.org",
                    name.to_lowercase(),
                    pick(r, NOUNS),
                    pick(r, CITIES).to_lowercase()
                );
                (
                    format!("For details, write to {name} at {email} before Friday."),
                    email,
                )
            }),
        },
        TaskSpec {
            name: "add".into(),
            family: "arith",
            systems: [
                "Add the two numbers and reply with the sum.".into(),
                "What is the total of the two numbers? Digits only.".into(),
                "Reply with the sum of the numbers given.".into(),
            ],
            make: Box::new(|r| {
                let (a, b): (u32, u32) = (r.random_range(10..100), r.random_range(10..100));
                (format!("{a} + {b}"), (a + b).to_string())
            }),
        },
        TaskSpec {
            name: "subtract".into(),
            family: "arith",
            systems: [
                "Subtract the second number from the first and reply with the result.".into(),
                "What is the difference of the two numbers? Digits only.".into(),
                "Reply with the first number minus the second.".into(),
            ],
            make: Box::new(|r| {
                let a: u32 = r.random_range(20..100);
                let b: u32 = r.random_range(1..a);
                (format!("{a} - {b}"), (a - b).to_string())
            }),
        },
        TaskSpec {
            name: "multiply".into(),
            family: "arith",
            systems: [
                "Multiply the numbers and reply with the product.".into(),
                "What is the product of the two numbers? Digits only.".into(),
                "Reply with the result of the multiplication.".into(),
            ],
            make: Box::new(|r| {
                let (a, b): (u32, u32) = (r.random_range(11..100), r.random_range(2..13));
                (format!("{a} * {b}"), (a * b).to_string())
            }),
        },
        TaskSpec {
            name: "successor".into(),
            family: "arith",
            systems: [
                "Reply with the number that comes right after the given one.".into(),
                "What is the next integer? Digits only.".into(),
                "Add one to the number and reply with the result.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(100..10000);
                (n.to_string(), (n + 1).to_string())
            }),
        },
        TaskSpec {
            name: "largest".into(),
            family: "arith",
            systems: [
                "Reply with the largest of the numbers.".into(),
                "Which number is the biggest? Answer with it alone.".into(),
                "Give the maximum of the listed numbers.".into(),
            ],
            make: Box::new(|r| {
                let v: Vec<u32> = (0..3).map(|_| r.random_range(0..1000)).collect();
                let max = *v.iter().max().expect("three numbers");
                let list: Vec<String> = v.iter().map(u32::to_string).collect();
                (list.join(", "), max.to_string())
            }),
        },
        // Bracketed answers outside the classify family (added after the held-out classify
        // family scored 0%: its bracketed labels were the only brackets the generator saw),
        // so that an answer format is not the mark of a single family. Listed last, so the
        // earlier tasks' seeded data are unchanged.
        TaskSpec {
            name: "extract_day".into(),
            family: "extract",
            systems: [
                "Reply with the weekday mentioned in the text, in square brackets, like [Monday].".into(),
                "Which day of the week does the sentence name? Answer with it inside brackets.".into(),
                "Find the day of the week in the text and give it between square brackets.".into(),
            ],
            make: Box::new(|r| {
                let (name, day, city) = (pick(r, NAMES), pick(r, WEEKDAYS), pick(r, CITIES));
                let text = match r.random_range(0..3) {
                    0 => format!("{name} is meeting friends in {city} on {day}."),
                    1 => format!("On {day}, {name} took the train to {city}."),
                    _ => format!("The {} in {city} opens again on {day}.", pick(r, NOUNS)),
                };
                (text, format!("[{day}]"))
            }),
        },
        TaskSpec {
            name: "extract_animal".into(),
            family: "extract",
            systems: [
                "Reply with the animal mentioned in the text, in square brackets, like [cat].".into(),
                "Which animal does the sentence talk about? Answer with it inside brackets.".into(),
                "Find the animal in the text and give its name between square brackets.".into(),
            ],
            make: Box::new(|r| {
                let (name, animal, adj) = (pick(r, NAMES), pick(r, ANIMALS), pick(r, ADJECTIVES));
                let text = match r.random_range(0..3) {
                    0 => format!("{name} saw a {adj} {animal} near the {}.", pick(r, NOUNS)),
                    1 => format!("A {animal} followed {name} all the way home."),
                    _ => format!("The {adj} {animal} slept beside the {}.", pick(r, NOUNS)),
                };
                (text, format!("[{animal}]"))
            }),
        },
        TaskSpec {
            name: "last_digit".into(),
            family: "arith",
            systems: [
                "Add the two numbers and reply with the last digit of the sum in square brackets, like [7].".into(),
                "What is the final digit of the sum of the numbers? Answer inside brackets.".into(),
                "Give the units digit of the total of the two numbers, between square brackets.".into(),
            ],
            make: Box::new(|r| {
                let (a, b): (u32, u32) = (r.random_range(10..100), r.random_range(10..100));
                (format!("{a} + {b}"), format!("[{}]", (a + b) % 10))
            }),
        },
        TaskSpec {
            name: "first_word".into(),
            family: "format",
            systems: [
                "Reply with the first word of the text in square brackets, like [quiet].".into(),
                "Which word does the text start with? Answer with it inside brackets.".into(),
                "Give the opening word of the text between square brackets.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let first = p.split(' ').next().unwrap_or_default().to_string();
                (p, format!("[{first}]"))
            }),
        },
        // Six more tasks per family (session 13), to measure whether more neighbours in a
        // family help a held-out task of it. Written after the first held-out results were
        // known; listed last, so the earlier tasks' seeded data are unchanged.
        TaskSpec {
            name: "lower_case".into(),
            family: "format",
            systems: [
                "Rewrite the user's text in small letters only.".into(),
                "Answer with the same text, written entirely in lower case.".into(),
                "Convert the text you are given to lowercase and reply with nothing else.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                (p.to_uppercase(), p)
            }),
        },
        TaskSpec {
            name: "last_word".into(),
            family: "format",
            systems: [
                "Reply with the last word of the user's text.".into(),
                "Which word does the text end with? Answer with that word alone.".into(),
                "Give only the final word of the text.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let last = p.split(' ').next_back().unwrap_or_default().to_string();
                (p, last)
            }),
        },
        TaskSpec {
            name: "title_case".into(),
            family: "format",
            systems: [
                "Rewrite the text with every word capitalised.".into(),
                "Answer with the same words, each starting with a capital letter.".into(),
                "Put the text in title case: a capital letter at the start of each word.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                let t = p.split(' ').map(capitalise).collect::<Vec<_>>().join(" ");
                (p, t)
            }),
        },
        TaskSpec {
            name: "hyphen_join".into(),
            family: "format",
            systems: [
                "Join the user's words with hyphens instead of spaces.".into(),
                "Answer with the same words linked by dashes, no spaces.".into(),
                "Replace every space in the text with a hyphen.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                (p.clone(), p.replace(' ', "-"))
            }),
        },
        TaskSpec {
            name: "quote_text".into(),
            family: "format",
            systems: [
                "Reply with the user's text inside double quotes.".into(),
                "Repeat the text, wrapped in quotation marks.".into(),
                "Give the text back between a pair of double quotes.".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                (p.clone(), format!("\"{p}\""))
            }),
        },
        TaskSpec {
            name: "answer_prefix".into(),
            family: "format",
            systems: [
                "Repeat the user's text after the prefix \"Answer: \".".into(),
                "Start your reply with \"Answer: \" followed by the text you were given.".into(),
                "Reply with the text, preceded by the words \"Answer: \".".into(),
            ],
            make: Box::new(|r| {
                let p = phrase(r);
                (p.clone(), format!("Answer: {p}"))
            }),
        },
        TaskSpec {
            name: "review_stars".into(),
            family: "classify",
            systems: [
                "Rate the review [5] if it is positive and [1] if it is negative.".into(),
                "Give the review a score: [5] for praise, [1] for a complaint.".into(),
                "Answer [5] when the reviewer was pleased and [1] when not.".into(),
            ],
            make: Box::new(|r| {
                let (t, good) = review(r);
                (t, if good { "[5]" } else { "[1]" }.into())
            }),
        },
        TaskSpec {
            name: "topic_letter".into(),
            family: "classify",
            systems: [
                "Is the sentence about (A) sport, (B) food or (C) technology? Reply [A], [B] or [C].".into(),
                "Pick the topic: [A] sport, [B] food, [C] tech. Answer with the bracketed letter.".into(),
                "Classify the sentence: [A] for sport, [B] for food, [C] for technology.".into(),
            ],
            make: Box::new(|r| {
                let (s, label) = topic_sentence(r, ["[A]", "[B]", "[C]"]);
                let name = pick(r, NAMES);
                let city = pick(r, CITIES);
                (format!("In {city}, {name} noted: {s}."), label.into())
            }),
        },
        TaskSpec {
            name: "is_question".into(),
            family: "classify",
            systems: [
                "Answer [yes] if the text is a question and [no] if it is a statement.".into(),
                "Is the user's sentence a question? Reply [yes] or [no].".into(),
                "Tell whether the text asks something: [yes] or [no].".into(),
            ],
            make: Box::new(|r| {
                let (name, noun, city) = (pick(r, NAMES), pick(r, NOUNS), pick(r, CITIES));
                let q = rng_bool(r);
                let text = match (q, r.random_range(0..3)) {
                    (true, 0) => format!("Did {name} leave the {noun} in {city}?"),
                    (true, 1) => format!("Where is the {noun} that {name} bought in {city}?"),
                    (true, _) => format!("Can {name} bring the {noun} to {city}?"),
                    (false, 0) => format!("{name} left the {noun} in {city}."),
                    (false, 1) => format!("The {noun} that {name} bought is in {city}."),
                    (false, _) => format!("{name} can bring the {noun} to {city}."),
                };
                (text, yes_no(q))
            }),
        },
        TaskSpec {
            name: "is_animal".into(),
            family: "classify",
            systems: [
                "Answer [yes] if the thing named is an animal and [no] otherwise.".into(),
                "Is the word an animal? Reply [yes] or [no].".into(),
                "Say [yes] when the text names an animal, else [no].".into(),
            ],
            make: Box::new(|r| {
                let animal = rng_bool(r);
                let thing = pick(r, if animal { ANIMALS } else { NOUNS });
                let (adj, name) = (pick(r, ADJECTIVES), pick(r, NAMES));
                (format!("{name}'s {adj} {thing}"), yes_no(animal))
            }),
        },
        TaskSpec {
            name: "odd".into(),
            family: "classify",
            systems: [
                "Answer [yes] if the number is odd and [no] if it is even.".into(),
                "Is the number odd? Reply [yes] or [no].".into(),
                "Tell whether the given number is odd: [yes] or [no].".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(0..1000);
                (n.to_string(), yes_no(n % 2 == 1))
            }),
        },
        TaskSpec {
            name: "smaller".into(),
            family: "classify",
            systems: [
                "Is the first number smaller than the second? Answer [yes] or [no].".into(),
                "Reply [yes] when the first number is the lower one, else [no].".into(),
                "Compare the two numbers: [yes] if the first is less, [no] otherwise.".into(),
            ],
            make: Box::new(|r| {
                let (a, b) = distinct_pair(r);
                (format!("{a} versus {b}"), yes_no(a < b))
            }),
        },
        TaskSpec {
            name: "extract_year".into(),
            family: "extract",
            systems: [
                "Reply with the year mentioned in the text.".into(),
                "In which year did it happen? Answer with the four digits only.".into(),
                "Extract the year from the sentence.".into(),
            ],
            make: Box::new(|r| {
                let (name, city) = (pick(r, NAMES), pick(r, CITIES));
                let y: u32 = r.random_range(1900..2030);
                let text = match r.random_range(0..3) {
                    0 => format!("{name} moved to {city} in {y}."),
                    1 => format!("In {y}, {name} opened a shop in {city}."),
                    _ => format!("The {} of {city} was built in {y}.", pick(r, NOUNS)),
                };
                (text, y.to_string())
            }),
        },
        TaskSpec {
            name: "extract_price".into(),
            family: "extract",
            systems: [
                "Reply with the price in the text, with its dollar sign.".into(),
                "How much did it cost? Answer with the amount as written, like $12.".into(),
                "Extract the dollar amount from the sentence.".into(),
            ],
            make: Box::new(|r| {
                let (name, noun) = (pick(r, NAMES), pick(r, NOUNS));
                let p: u32 = r.random_range(2..1000);
                (format!("{name} paid ${p} for a {noun}."), format!("${p}"))
            }),
        },
        TaskSpec {
            name: "extract_time".into(),
            family: "extract",
            systems: [
                "Reply with the time of day mentioned in the text, like 7:30.".into(),
                "At what time does it happen? Answer with the clock time only.".into(),
                "Extract the time from the sentence.".into(),
            ],
            make: Box::new(|r| {
                let (name, city) = (pick(r, NAMES), pick(r, CITIES));
                let (h, m): (u32, u32) = (r.random_range(1..13), 5 * r.random_range(0..12));
                let t = format!("{h}:{m:02}");
                let text = match r.random_range(0..2) {
                    0 => format!("{name}'s train to {city} leaves at {t}."),
                    _ => format!("The meeting in {city} with {name} starts at {t}."),
                };
                (text, t)
            }),
        },
        TaskSpec {
            name: "extract_origin".into(),
            family: "extract",
            systems: [
                "Reply with the city the person travelled from.".into(),
                "Where did the traveller start? Answer with the city name only.".into(),
                "Name the city the trip departed from.".into(),
            ],
            make: Box::new(|r| {
                let name = pick(r, NAMES);
                let from = pick(r, CITIES);
                let mut to = pick(r, CITIES);
                while to == from {
                    to = pick(r, CITIES);
                }
                (
                    format!("{name} took a bus from {from} to {to} on the weekend."),
                    from.into(),
                )
            }),
        },
        TaskSpec {
            name: "extract_domain".into(),
            family: "extract",
            systems: [
                "Reply with the domain of the email address in the text (the part after @).".into(),
                "Which domain does the email address use? Answer with it alone.".into(),
                "Extract the part of the email address that follows the @ sign.".into(),
            ],
            make: Box::new(|r| {
                let name = pick(r, NAMES);
                let domain = format!("{}.{}", pick(r, NOUNS), pick(r, &["com", "net", "org"]));
                let user = format!("{}{}", name.to_lowercase(), r.random_range(1..100));
                (format!("You can reach {name} at {user}@{domain} any time."), domain)
            }),
        },
        TaskSpec {
            name: "extract_item".into(),
            family: "extract",
            systems: [
                "Reply with the thing the person bought, in the singular.".into(),
                "What did they buy? Answer with the object's name only.".into(),
                "Extract the purchased item from the sentence, singular form.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(2..50);
                let (name, noun, city) = (pick(r, NAMES), pick(r, NOUNS), pick(r, CITIES));
                (format!("{name} bought {n} {noun}s in {city}."), noun.into())
            }),
        },
        TaskSpec {
            name: "predecessor".into(),
            family: "arith",
            systems: [
                "Reply with the number that comes right before the given one.".into(),
                "What is the previous integer? Digits only.".into(),
                "Subtract one from the number and reply with the result.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(100..10000);
                (n.to_string(), (n - 1).to_string())
            }),
        },
        TaskSpec {
            name: "double".into(),
            family: "arith",
            systems: [
                "Reply with twice the given number.".into(),
                "What is the number multiplied by two? Digits only.".into(),
                "Double the number and reply with the result.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(10..2000);
                (n.to_string(), (2 * n).to_string())
            }),
        },
        TaskSpec {
            name: "smallest".into(),
            family: "arith",
            systems: [
                "Reply with the smallest of the numbers.".into(),
                "Which number is the lowest? Answer with it alone.".into(),
                "Give the minimum of the listed numbers.".into(),
            ],
            make: Box::new(|r| {
                let v: Vec<u32> = (0..3).map(|_| r.random_range(0..1000)).collect();
                let min = *v.iter().min().expect("three numbers");
                let list: Vec<String> = v.iter().map(u32::to_string).collect();
                (list.join(", "), min.to_string())
            }),
        },
        TaskSpec {
            name: "add_three".into(),
            family: "arith",
            systems: [
                "Add the three numbers and reply with the sum.".into(),
                "What do the three numbers add up to? Digits only.".into(),
                "Reply with the total of the three numbers.".into(),
            ],
            make: Box::new(|r| {
                let v: Vec<u32> = (0..3).map(|_| r.random_range(1..30)).collect();
                let list: Vec<String> = v.iter().map(u32::to_string).collect();
                (list.join(" + "), v.iter().sum::<u32>().to_string())
            }),
        },
        TaskSpec {
            name: "half".into(),
            family: "arith",
            systems: [
                "Reply with half of the given number.".into(),
                "What is the number divided by two? Digits only.".into(),
                "Halve the number and reply with the result.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = 2 * r.random_range(5..1000);
                (n.to_string(), (n / 2).to_string())
            }),
        },
        TaskSpec {
            name: "plus_ten".into(),
            family: "arith",
            systems: [
                "Add ten to the number and reply with the result.".into(),
                "What is the number plus 10? Digits only.".into(),
                "Reply with the number increased by ten.".into(),
            ],
            make: Box::new(|r| {
                let n: u32 = r.random_range(10..10000);
                (n.to_string(), (n + 10).to_string())
            }),
        },
    ]
}

/// A task's entry in `tasks.json`.
#[derive(Debug, Serialize)]
pub struct TaskEntry {
    /// File-name stem.
    pub name: String,
    /// Family.
    pub family: String,
    /// The paraphrased system prompts (the last one only in the test split).
    pub systems: Vec<String>,
    /// With `--more-wordings`: the six more training wordings, after the first two of `systems`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_systems: Vec<String>,
    /// Training examples.
    pub train: usize,
    /// Test examples.
    pub test: usize,
}

/// Train and test examples of one task: distinct prompts, none of the test prompts in
/// training. Seeded by `seed` and the task's position.
pub fn examples(
    spec: &TaskSpec,
    index: usize,
    train: usize,
    test: usize,
    seed: u64,
) -> Result<(Vec<Example>, Vec<Example>)> {
    examples_with_wordings(spec, index, train, test, seed, &[])
}

/// The six more training wordings of skill task `name` (`dnd tasks --more-wordings`), if it
/// has them.
pub fn more_wordings(name: &str) -> Option<&'static [&'static str; 6]> {
    wordings::MORE_WORDINGS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, w)| w)
}

/// [`examples`], with training example i under wording i mod (2 + `more`.len()) of the
/// task's two training system prompts followed by `more`: the same prompts and answers as
/// without them (the wordings draw nothing from the seed), the same test split.
pub fn examples_with_wordings(
    spec: &TaskSpec,
    index: usize,
    train: usize,
    test: usize,
    seed: u64,
    more: &[&str],
) -> Result<(Vec<Example>, Vec<Example>)> {
    let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(index as u64));
    let mut seen = HashSet::new();
    let mut draw = |k: usize, systems: &[String]| -> Result<Vec<Example>> {
        let mut out = Vec::with_capacity(k);
        let mut tries = 0;
        while out.len() < k {
            tries += 1;
            if tries > 50 * (k + 10) {
                return Err(DndError::InvalidInput(format!(
                    "task {}: fewer than {} distinct prompts",
                    spec.name,
                    train + test
                )));
            }
            let (prompt, response) = spec.example(&mut rng);
            if seen.insert(prompt.clone()) {
                let system = systems[out.len() % systems.len()].clone();
                out.push(Example {
                    prompt,
                    response,
                    system: Some(system),
                });
            }
        }
        Ok(out)
    };
    let train_systems: Vec<String> = spec.systems[..2]
        .iter()
        .cloned()
        .chain(more.iter().map(|s| s.to_string()))
        .collect();
    let tr = draw(train, &train_systems)?;
    let te = draw(test, &spec.systems[2..])?;
    Ok((tr, te))
}

/// Writes the train and test files of the first `count` tasks of `suite` (every task when
/// `None`) and `tasks.json` under `out`. A task's data depend only on the seed and its
/// position, so the first N are the same whatever the count. With `more_wordings` (skill tasks
/// only) each task's training examples cycle through eight system prompts instead of two
/// ([`more_wordings`]); prompts, answers and the test split stay the same.
pub fn write_tasks(
    out: &Path,
    suite: Suite,
    train: usize,
    test: usize,
    seed: u64,
    count: Option<usize>,
    more_wordings: bool,
) -> Result<Vec<TaskEntry>> {
    if more_wordings && suite != Suite::Skills {
        return Err(DndError::InvalidInput(
            "more wordings exist for the skill tasks only".into(),
        ));
    }
    let specs = suite.tasks();
    let count = count.unwrap_or(specs.len());
    if count == 0 || count > specs.len() {
        return Err(DndError::InvalidInput(format!(
            "task count {count}: there are {} tasks",
            specs.len()
        )));
    }
    std::fs::create_dir_all(out).map_err(|e| DndError::io(out, e))?;
    let mut entries = Vec::new();
    for (i, spec) in specs.iter().take(count).enumerate() {
        let more: Vec<&str> = match more_wordings {
            true => self::more_wordings(&spec.name)
                .ok_or_else(|| {
                    DndError::InvalidInput(format!("task {} has no more wordings", spec.name))
                })?
                .to_vec(),
            false => Vec::new(),
        };
        let (tr, te) = examples_with_wordings(spec, i, train, test, seed, &more)?;
        for (split, v) in [("train", &tr), ("test", &te)] {
            let path = out.join(format!("{}_{split}.json", spec.name));
            let items: Vec<serde_json::Value> = v
                .iter()
                .map(|e| {
                    serde_json::json!({"prompt": e.prompt, "response": e.response, "system": e.system})
                })
                .collect();
            let text = serde_json::to_string_pretty(&items).expect("strings serialize");
            std::fs::write(&path, text).map_err(|e| DndError::io(&path, e))?;
        }
        entries.push(TaskEntry {
            name: spec.name.clone(),
            family: spec.family.into(),
            systems: spec.systems.to_vec(),
            more_systems: more.iter().map(|s| s.to_string()).collect(),
            train: tr.len(),
            test: te.len(),
        });
    }
    let path = out.join("tasks.json");
    let text = serde_json::to_string_pretty(&entries).expect("entries serialize");
    std::fs::write(&path, text).map_err(|e| DndError::io(&path, e))?;
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::{is_correct, parse_choice};

    #[test]
    fn every_task_makes_distinct_verifiable_examples() {
        let specs = all_tasks();
        assert!(specs.len() >= 48);
        check_suite(&specs);
    }

    #[test]
    fn parametric_tasks_state_their_parameter_and_answer_by_it() {
        let specs = param_tasks();
        assert_eq!(specs.len(), 29 + 8 + 5 + 12 + 12);
        check_suite(&specs);
        let by_name = |n: &str| specs.iter().find(|s| s.name == n).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..20 {
            let (p, r) = by_name("add_17").example(&mut rng);
            assert_eq!(r.parse::<u32>().unwrap(), p.parse::<u32>().unwrap() + 17);
            let (p, r) = by_name("times_6").example(&mut rng);
            assert_eq!(r.parse::<u32>().unwrap(), p.parse::<u32>().unwrap() * 6);
            let (p, r) = by_name("word_3").example(&mut rng);
            assert_eq!(p.split(' ').nth(2).unwrap(), r);
            let (p, r) = by_name("wrap_angle").example(&mut rng);
            assert_eq!(r, format!("<{p}>"));
            let (_, r) = by_name("label_win_lose").example(&mut rng);
            assert!(r == "[win]" || r == "[lose]", "{r}");
        }
        // Each instruction names its parameter, in all three paraphrases.
        for (name, said) in [
            ("add_17", "17"),
            ("times_6", "6"),
            ("word_3", "third"),
            ("wrap_angle", "<"),
            ("label_win_lose", "[win]"),
        ] {
            assert!(
                by_name(name).systems.iter().all(|s| s.contains(said)),
                "{name}"
            );
        }
    }

    #[test]
    fn compositional_tasks_answer_their_field_in_their_form() {
        let specs = compose_tasks();
        assert_eq!(specs.len(), 7 * 5 - 2);
        check_suite(&specs);
        // Undo each form, then check the value against the prompt and the field's word list.
        let unshape = |form: &str, r: &str| -> String {
            match form {
                "plain" | "upper" => r.to_string(),
                "paren" => r
                    .strip_prefix('(')
                    .unwrap()
                    .strip_suffix(')')
                    .unwrap()
                    .into(),
                "quote" => r
                    .strip_prefix('"')
                    .unwrap()
                    .strip_suffix('"')
                    .unwrap()
                    .into(),
                "prefix" => r.strip_prefix("Answer: ").unwrap().into(),
                _ => panic!("unknown form {form}"),
            }
        };
        let mut rng = StdRng::seed_from_u64(9);
        for spec in &specs {
            let (field, form) = spec.name.split_once('_').unwrap();
            assert_eq!(spec.family, form);
            for _ in 0..20 {
                let (p, r) = spec.example(&mut rng);
                let v = unshape(form, &r);
                if form == "upper" {
                    assert_eq!(v, v.to_uppercase(), "{}: {r}", spec.name);
                }
                let words: Vec<String> = p
                    .split(|c: char| c.is_whitespace() || c == ',' || c == '.')
                    .map(|w| w.to_uppercase())
                    .collect();
                let plural = format!("{}S", v.to_uppercase());
                assert!(
                    words.contains(&v.to_uppercase())
                        || (field == "item" && words.contains(&plural)),
                    "{}: {v} not in {p}",
                    spec.name
                );
                let known = |list: &[&str]| list.iter().any(|w| w.eq_ignore_ascii_case(&v));
                match field {
                    "name" => assert!(known(NAMES)),
                    "city" => assert!(known(CITIES)),
                    "day" => assert!(known(WEEKDAYS)),
                    "color" => assert!(known(COLORS)),
                    "item" => assert!(known(NOUNS)),
                    "count" => assert!((2..=9).contains(&v.parse::<u32>().unwrap())),
                    "price" => assert!(v.strip_prefix('$').unwrap().parse::<u32>().is_ok()),
                    _ => panic!("unknown field {field}"),
                }
            }
        }
        // Every field with every form except upper case of the two numbers.
        assert!(!specs.iter().any(|s| s.name == "price_upper"));
        assert!(specs.iter().any(|s| s.name == "item_quote"));
    }

    #[test]
    fn compositional_holdout_leaves_every_part_trained_elsewhere() {
        let specs = compose_tasks();
        let held: HashSet<&str> = COMPOSE_HELD_OUT.iter().copied().collect();
        assert_eq!(held.len(), 7);
        let split = |n: &str| {
            n.split_once('_')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        };
        let trained: Vec<(String, String)> = specs
            .iter()
            .filter(|s| !held.contains(s.name.as_str()))
            .map(|s| split(&s.name).unwrap())
            .collect();
        let mut fields = HashSet::new();
        for name in COMPOSE_HELD_OUT {
            assert!(specs.iter().any(|s| s.name == name), "{name} is a task");
            let (field, form) = split(name).unwrap();
            assert_ne!(form, "plain");
            assert!(fields.insert(field.clone()), "one per field");
            // Its field with another form, and its form with another field, are trained.
            assert!(
                trained.iter().filter(|(f, _)| *f == field).count() >= 2,
                "{name}"
            );
            assert!(
                trained.iter().filter(|(_, g)| *g == form).count() >= 3,
                "{name}"
            );
        }
        assert_eq!(fields.len(), 7);
    }

    /// Distinct, verifiable, seeded examples; the test split only under the unseen paraphrase;
    /// choice tasks not dominated by one label; families and names as the suite promises.
    fn check_suite(specs: &[TaskSpec]) {
        let families: HashSet<&str> = specs.iter().map(|s| s.family).collect();
        assert!(families.len() >= 4, "{families:?}");
        let names: HashSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names.len(), specs.len(), "task names are unique");
        for (i, spec) in specs.iter().enumerate() {
            let (tr, te) = examples(spec, i, 300, 200, 0).unwrap();
            assert_eq!((tr.len(), te.len()), (300, 200));
            let train_prompts: HashSet<&str> = tr.iter().map(|e| e.prompt.as_str()).collect();
            assert!(te
                .iter()
                .all(|e| !train_prompts.contains(e.prompt.as_str())));
            // The test split uses the unseen paraphrase only.
            assert!(te
                .iter()
                .all(|e| e.system.as_deref() == Some(spec.systems[2].as_str())));
            assert!(tr
                .iter()
                .all(|e| e.system.as_deref() != Some(spec.systems[2].as_str())));
            for e in tr.iter().chain(&te) {
                assert!(is_correct(&e.response, &e.response), "{}: {e:?}", spec.name);
            }
            // Choice tasks are not dominated by one label.
            if parse_choice(&te[0].response).is_some() {
                let (_, k) = crate::eval::constant_baseline(&te);
                assert!(k < 150, "{}: constant answer right on {k}/200", spec.name);
            }
            // Seeded: the same seed gives the same examples, another seed others.
            let (again, _) = examples(spec, i, 300, 200, 0).unwrap();
            assert_eq!(again[17].prompt, tr[17].prompt);
        }
        let (a, _) = examples(&specs[0], 0, 50, 10, 0).unwrap();
        let (b, _) = examples(&specs[0], 0, 50, 10, 1).unwrap();
        assert_ne!(
            a.iter().map(|e| &e.prompt).collect::<Vec<_>>(),
            b.iter().map(|e| &e.prompt).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_first_tasks_are_the_same_whatever_the_count() {
        let base = std::env::temp_dir().join(format!("dnd-tasks-{}", std::process::id()));
        let (few, all) = (base.join("few"), base.join("all"));
        let written = write_tasks(&few, Suite::Skills, 20, 5, 3, Some(2), false).unwrap();
        assert_eq!(written.len(), 2);
        assert_eq!(
            write_tasks(&all, Suite::Skills, 20, 5, 3, None, false)
                .unwrap()
                .len(),
            all_tasks().len()
        );
        for e in &written {
            for split in ["train", "test"] {
                let name = format!("{}_{split}.json", e.name);
                let a = std::fs::read(few.join(&name)).unwrap();
                assert_eq!(a, std::fs::read(all.join(&name)).unwrap(), "{name}");
            }
        }
        assert!(!few
            .join(format!("{}_train.json", all_tasks()[2].name))
            .exists());
        let listed: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(few.join("tasks.json")).unwrap())
                .unwrap();
        assert_eq!(listed.len(), 2);
        for bad in [0, all_tasks().len() + 1] {
            assert!(
                write_tasks(&base.join("bad"), Suite::Skills, 20, 5, 3, Some(bad), false).is_err(),
                "{bad}"
            );
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn more_wordings_change_only_the_training_system_prompts() {
        let specs = all_tasks();
        let mut seen = HashSet::new();
        for spec in &specs {
            let more = more_wordings(&spec.name).unwrap_or_else(|| panic!("{}", spec.name));
            for w in more {
                assert!(!spec.systems.iter().any(|s| s == w), "{}: {w}", spec.name);
                assert!(seen.insert(*w), "{w} is used twice");
            }
        }
        assert_eq!(wordings::MORE_WORDINGS.len(), specs.len());
        let base = std::env::temp_dir().join(format!("dnd-wordings-{}", std::process::id()));
        let (two, eight) = (base.join("two"), base.join("eight"));
        write_tasks(&two, Suite::Skills, 40, 5, 0, Some(3), false).unwrap();
        let entries = write_tasks(&eight, Suite::Skills, 40, 5, 0, Some(3), true).unwrap();
        let read = |dir: &Path, file: &str| -> Vec<serde_json::Value> {
            serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap()
        };
        for (spec, entry) in specs.iter().zip(&entries) {
            assert_eq!(entry.more_systems.len(), 6);
            let test = format!("{}_test.json", spec.name);
            assert_eq!(read(&two, &test), read(&eight, &test));
            let train = format!("{}_train.json", spec.name);
            let (a, b) = (read(&two, &train), read(&eight, &train));
            let mut systems = HashSet::new();
            for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                assert_eq!(x["prompt"], y["prompt"]);
                assert_eq!(x["response"], y["response"]);
                let want = match i % 8 {
                    j @ 0..=1 => spec.systems[j].as_str(),
                    j => more_wordings(&spec.name).unwrap()[j - 2],
                };
                assert_eq!(y["system"], want, "{} example {i}", spec.name);
                systems.insert(y["system"].as_str().unwrap().to_string());
            }
            assert_eq!(systems.len(), 8);
        }
        assert!(write_tasks(&base.join("p"), Suite::Params, 4, 2, 0, Some(1), true).is_err());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
