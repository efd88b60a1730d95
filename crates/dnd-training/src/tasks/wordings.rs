//! Six more training wordings of each skill task's instruction (`dnd tasks --more-wordings`).
//!
//! With two training paraphrases per task, written in parallel across tasks ("... in capital
//! letters only." / "... in small letters only."), generated adapters follow the sentence's
//! form more than the word that names the task. Eight wordings per task lifted the three case
//! tasks from 2/84/84% to 15/99/100% from their unseen test paraphrase after the same training
//! (docs/results/task-specificity-smollm2.md). These wordings vary the frame (imperative,
//! question, role, terse "Output:" line). Tasks that differ in one notion (greater / smaller,
//! successor / predecessor) share some frames, so that the word naming the task is what tells
//! them apart. None is a task's test paraphrase, and none is used twice. The case tasks' six are
//! the ones that experiment used, in its order.

/// Task name and its six extra training wordings, for every task of [`super::all_tasks`].
pub(super) const MORE_WORDINGS: &[(&str, [&str; 6])] = &[
    (
        "upper_case",
        [
            "Shout the phrase back: every letter a capital.",
            "Repeat the words using ALL CAPS.",
            "You act as a caps-lock key. Echo the input in block capitals.",
            "Give me the message again, but make all of its letters uppercase ones.",
            "Capitalise every single letter of the input and return it.",
            "Output: the input string, upper-cased.",
        ],
    ),
    (
        "reverse_words",
        [
            "Read the words backwards, from the end to the start, and say them.",
            "Flip the word order of the phrase; keep each word as it is.",
            "You are a mirror for sentences: the last word comes out first.",
            "Begin with the final word and work your way back to the first one.",
            "Turn the sequence of words around.",
            "Output: the same words, reversed in order.",
        ],
    ),
    (
        "json_word",
        [
            "Produce a one-field JSON object; its field is named word.",
            "Format the token as JSON like {\"word\": ...}.",
            "You are an API that answers in JSON. Put the input under \"word\".",
            "Encode what you were given as a JSON object keyed by \"word\".",
            "Emit JSON only: {\"word\": <the text>}.",
            "Output: a JSON object mapping \"word\" to the input.",
        ],
    ),
    (
        "first_letters",
        [
            "Take the opening letter of every word and write them as one string.",
            "Make an acronym of the phrase in lowercase letters, no spaces.",
            "You compress phrases: keep just the first character of each word.",
            "String together the initial letter of each word you see.",
            "Drop everything but the leading letters of the words.",
            "Output: the words' first letters, concatenated.",
        ],
    ),
    (
        "count_words",
        [
            "Tell me how long the phrase is, in words, as a numeral.",
            "Word count, please: just the number.",
            "You are a word counter. State how many words the input holds.",
            "How many separate words did I send? Give the count.",
            "Determine the number of words and answer with that figure.",
            "Output: the number of words in the input.",
        ],
    ),
    (
        "sentiment",
        [
            "Decide whether the reviewer liked it: [positive], or didn't: [negative].",
            "Tag this opinion with [positive] or [negative].",
            "You are a sentiment classifier; reply with [positive] or [negative] only.",
            "Was the experience described favourably? Use [positive] or [negative].",
            "Mark the review's tone as [positive] or [negative].",
            "Output: [positive] or [negative], the review's sentiment.",
        ],
    ),
    (
        "sentiment_good_bad",
        [
            "Did the writer enjoy it? Say [good] for yes, [bad] for no.",
            "Judge the feeling in the text: [good] or [bad].",
            "You grade opinions as [good] or [bad]; grade this one.",
            "Pick [good] when the comment is favourable and [bad] when it is not.",
            "Verdict on the opinion, [good] or [bad]?",
            "Output: [good] or [bad], how the speaker felt.",
        ],
    ),
    (
        "topic",
        [
            "What is the sentence about? Choose [sport], [food] or [tech].",
            "Sort this line under [sport], [food] or [tech].",
            "You are a news sorter with three desks: [sport], [food], [tech].",
            "Assign the text one subject label: [sport], [food] or [tech].",
            "Tell me the subject area, [sport], [food] or [tech].",
            "Output: the topic label, [sport], [food] or [tech].",
        ],
    ),
    (
        "parity",
        [
            "Can the number be split into two equal whole halves? [yes] or [no].",
            "Even number? Answer [yes]; odd, answer [no].",
            "You check divisibility by two. Reply [yes] if it divides evenly, [no] if not.",
            "Say [yes] for an even value and [no] for an odd one.",
            "Decide if the integer is even, [yes] or [no].",
            "Output: [yes] if even, [no] if odd.",
        ],
    ),
    (
        "greater",
        [
            "Does the first value exceed the second? [yes] or [no].",
            "Check: first > second? Reply [yes] or [no].",
            "You compare pairs of numbers. Say [yes] if the left one is higher, else [no].",
            "Reply [yes] only if the number given first is more than the other.",
            "Is the leading number bigger than the one after it? Bracketed yes or no.",
            "Output: [yes] if the first number is greater, [no] otherwise.",
        ],
    ),
    (
        "extract_number",
        [
            "Pull out the figure in the sentence and give it as digits.",
            "What count is given in the text? Just the numeral.",
            "You read sentences and return the number they contain.",
            "Find the amount written in the text and repeat it.",
            "Quote the digits that appear in the message, nothing else.",
            "Output: the number in the text.",
        ],
    ),
    (
        "extract_destination",
        [
            "Which city was the journey headed to? Name only that city.",
            "Tell me where the person ended up travelling to.",
            "You are a travel clerk: return the arrival city of the trip.",
            "Find the city the trip went to, not the one it left from.",
            "Give the city at the end of the journey.",
            "Output: the destination city.",
        ],
    ),
    (
        "extract_name",
        [
            "Find the person the sentence talks about and give their name.",
            "Name in the text? Write it alone.",
            "You pick out people's names. Return the one in this sentence.",
            "Tell me which person appears in the text.",
            "Copy out the first name of the person mentioned.",
            "Output: the person's name.",
        ],
    ),
    (
        "extract_color",
        [
            "Find the colour in the sentence and write just that word.",
            "What colour does the text mention? One word.",
            "You spot colours. Return the one named here.",
            "Tell me the colour the sentence refers to.",
            "Copy the colour word out of the text.",
            "Output: the colour mentioned.",
        ],
    ),
    (
        "extract_email",
        [
            "Find the email address in the message and copy it exactly.",
            "Which address should I write to? Give it as written.",
            "You harvest contact details: return the email address only.",
            "Pick out the address with the @ sign and repeat it.",
            "Tell me the email given in the text.",
            "Output: the email address.",
        ],
    ),
    (
        "add",
        [
            "Work out the sum of the pair and give only the result.",
            "Plus them together: what do you get?",
            "You are a calculator for addition. Return the total.",
            "Combine the two numbers by adding them.",
            "Compute the addition and write the answer in digits.",
            "Output: the sum.",
        ],
    ),
    (
        "subtract",
        [
            "Take the second number away from the first and give the result.",
            "First minus second equals what? Digits only.",
            "You are a calculator for subtraction. Return the difference.",
            "How much is left when the second number is removed from the first?",
            "Compute the subtraction and write the answer.",
            "Output: the difference.",
        ],
    ),
    (
        "multiply",
        [
            "Work out the product of the numbers and give only the result.",
            "Times them together: what do you get?",
            "You are a calculator for multiplication. Return the product.",
            "Find what the first number times the second makes.",
            "Compute the multiplication and write the answer in digits.",
            "Output: the product.",
        ],
    ),
    (
        "successor",
        [
            "Count one step up from the number and say where you land.",
            "Number plus one? Digits only.",
            "You increment integers by one. Return the result.",
            "Give the integer that follows the one you see.",
            "Which number comes next after this one?",
            "Output: the number incremented by one.",
        ],
    ),
    (
        "largest",
        [
            "Pick the highest value among the numbers and repeat it.",
            "Biggest number in the list? Just that number.",
            "You select maxima. Return the greatest of these numbers.",
            "Tell me which of the numbers is the largest one.",
            "Find the top value of the list.",
            "Output: the maximum.",
        ],
    ),
    (
        "extract_day",
        [
            "Name the weekday in the sentence, inside square brackets.",
            "Day of the week mentioned? Put it in [brackets].",
            "You find weekdays in text and return them bracketed, like [Friday].",
            "Tell me on which day it happens, written between [ and ].",
            "Copy the weekday out of the text and wrap it in brackets.",
            "Output: the weekday in square brackets.",
        ],
    ),
    (
        "extract_animal",
        [
            "Name the creature in the sentence, inside square brackets.",
            "Animal mentioned? Put it in [brackets].",
            "You find animals in text and return them bracketed, like [owl].",
            "Tell me which animal appears, written between [ and ].",
            "Copy the animal's name out of the text and wrap it in brackets.",
            "Output: the animal in square brackets.",
        ],
    ),
    (
        "last_digit",
        [
            "Sum the pair, then keep only the final digit, bracketed.",
            "Last digit of the total? Put it in [brackets].",
            "You add numbers and report just the ones digit, like [3].",
            "Work out the sum and give its rightmost digit between [ and ].",
            "What digit does the sum end in? Bracket it.",
            "Output: the units digit of the sum in square brackets.",
        ],
    ),
    (
        "first_word",
        [
            "Take the word the text begins with and put it in square brackets.",
            "Opening word? Bracket it.",
            "You return the first word of any text, like [river].",
            "Which word comes first in the phrase? Write it between [ and ].",
            "Copy out the leading word and wrap it in brackets.",
            "Output: the first word in square brackets.",
        ],
    ),
    (
        "lower_case",
        [
            "Take the capitals out: return the words with no uppercase letters at all.",
            "Echo the input, all lowercase.",
            "You are a text normaliser that removes capitalisation. Return the text in minuscule letters.",
            "Please write it back quietly, with every letter made small.",
            "Decapitalise each letter of the message and send it back.",
            "Output: the input string, lower-cased.",
        ],
    ),
    (
        "last_word",
        [
            "Take the word the text ends with and write it alone.",
            "Closing word? Just that word.",
            "You return the final word of any phrase.",
            "Which word comes at the very end? Give it.",
            "Copy out the trailing word of the message.",
            "Output: the last word.",
        ],
    ),
    (
        "title_case",
        [
            "Capitalise the first letter of every word and leave the rest small.",
            "Format the phrase like a book title, each word beginning with a capital.",
            "You are a headline editor: give every word an initial capital.",
            "Echo the words with only their first letters uppercase.",
            "Make the first character of each word a capital letter and the others lowercase.",
            "Output: the input string in Title Case.",
        ],
    ),
    (
        "hyphen_join",
        [
            "Glue the words together with a dash between each pair.",
            "Spaces become hyphens: rewrite the phrase that way.",
            "You make kebab-case slugs. Turn the phrase into one.",
            "Connect every word to the next with a '-' and no spaces.",
            "Write the phrase as a single hyphenated string.",
            "Output: the words joined by hyphens.",
        ],
    ),
    (
        "quote_text",
        [
            "Put the phrase between double quotation marks and return it.",
            "Quote it: \" at the start, \" at the end.",
            "You are a citation tool; return the text enclosed in double quotes.",
            "Surround what I wrote with a pair of \" marks.",
            "Echo the words as a quoted string.",
            "Output: the text in double quotes.",
        ],
    ),
    (
        "answer_prefix",
        [
            "Write \"Answer: \" and then copy the text after it.",
            "Prefix the phrase with Answer: and a space.",
            "You label replies. Begin with \"Answer: \", then repeat the input.",
            "Lead with the word Answer and a colon, then echo what you got.",
            "Echo the text, but put \"Answer: \" in front of it.",
            "Output: \"Answer: \" followed by the input.",
        ],
    ),
    (
        "review_stars",
        [
            "Score the opinion with stars: [5] if happy, [1] if unhappy.",
            "Five stars or one? Reply [5] or [1].",
            "You turn reviews into ratings, [5] for good and [1] for bad.",
            "Give [5] to a pleased reviewer and [1] to a disappointed one.",
            "How many stars, [5] or [1], does this review deserve?",
            "Output: [5] for a positive review, [1] for a negative one.",
        ],
    ),
    (
        "topic_letter",
        [
            "Choose the letter of the subject: [A] sport, [B] food, [C] technology.",
            "Sport, food or tech? Answer [A], [B] or [C].",
            "You file sentences under [A] sport, [B] food or [C] technology.",
            "Label the line with [A] if it is about sport, [B] food, [C] technology.",
            "Which letter fits the topic: [A] sport, [B] food, [C] tech?",
            "Output: [A], [B] or [C] for sport, food or technology.",
        ],
    ),
    (
        "is_question",
        [
            "Does the text ask something? [yes] if so, [no] if it just states.",
            "Question or statement? Reply [yes] for a question.",
            "You detect questions. Answer [yes] or [no].",
            "Say [yes] when the sentence is asking, [no] when it is telling.",
            "Is this an interrogative sentence, [yes] or [no]?",
            "Output: [yes] for a question, [no] otherwise.",
        ],
    ),
    (
        "is_animal",
        [
            "Is the thing mentioned a living creature of the animal kind? [yes] or [no].",
            "Animal or not? Reply [yes] or [no].",
            "You sort words into animals and non-animals; answer [yes] or [no].",
            "Say [yes] if what is named could be a pet or wild beast, [no] if not.",
            "Does the text name an animal, [yes] or [no]?",
            "Output: [yes] if it names an animal, [no] otherwise.",
        ],
    ),
    (
        "odd",
        [
            "Does dividing the number by two leave a remainder? [yes] or [no].",
            "Odd number? Answer [yes]; even, answer [no].",
            "You check for odd integers. Reply [yes] if it is odd, [no] if not.",
            "Say [yes] for an odd value and [no] for an even one.",
            "Decide if the integer is odd, [yes] or [no].",
            "Output: [yes] if odd, [no] if even.",
        ],
    ),
    (
        "smaller",
        [
            "Is the first value below the second? [yes] or [no].",
            "Check: first < second? Reply [yes] or [no].",
            "You compare pairs of numbers. Say [yes] if the left one is lower, else [no].",
            "Reply [yes] only if the number given first is less than the other.",
            "Is the leading number smaller than the one after it? Bracketed yes or no.",
            "Output: [yes] if the first number is smaller, [no] otherwise.",
        ],
    ),
    (
        "extract_year",
        [
            "Find the year in the sentence and write its four digits.",
            "Which year is named? Just the year.",
            "You pull dates out of text; return the year only.",
            "Tell me the year the sentence refers to.",
            "Copy the year out of the text.",
            "Output: the year.",
        ],
    ),
    (
        "extract_price",
        [
            "Find the cost in the sentence and write it with the $ sign.",
            "What was paid? Give the dollar figure as written.",
            "You pull prices out of text; return the amount, dollar sign included.",
            "Tell me the price mentioned, like $40.",
            "Copy the dollar amount out of the text.",
            "Output: the price with its dollar sign.",
        ],
    ),
    (
        "extract_time",
        [
            "Find the clock time in the sentence and write it as hours:minutes.",
            "What time is given? Just the time, like 9:15.",
            "You pull times out of text; return the time of day only.",
            "Tell me when, by the clock, it takes place.",
            "Copy the hour and minutes out of the text.",
            "Output: the time of day.",
        ],
    ),
    (
        "extract_origin",
        [
            "Which city did the journey start from? Name only that city.",
            "Tell me where the person set off from.",
            "You are a travel clerk: return the departure city of the trip.",
            "Find the city the trip left from, not the one it went to.",
            "Give the city at the start of the journey.",
            "Output: the city of departure.",
        ],
    ),
    (
        "extract_domain",
        [
            "Give the part of the email address to the right of the @.",
            "Email domain? Just the domain, like example.org.",
            "You parse email addresses and return the host after the @ sign.",
            "Tell me which domain the address belongs to.",
            "Copy out everything after the @ in the address.",
            "Output: the email address's domain.",
        ],
    ),
    (
        "extract_item",
        [
            "Name what was purchased, as one thing (singular).",
            "What was bought? One word, singular.",
            "You read shopping notes and return the item, in the singular.",
            "Tell me the object the person paid for, not the plural.",
            "Give the purchased thing's name in its singular form.",
            "Output: the item bought, singular.",
        ],
    ),
    (
        "predecessor",
        [
            "Count one step down from the number and say where you land.",
            "Number minus one? Digits only.",
            "You decrement integers by one. Return the result.",
            "Give the integer that comes just before the one you see.",
            "Which number precedes this one?",
            "Output: the number decremented by one.",
        ],
    ),
    (
        "double",
        [
            "Multiply the number by 2 and give the result.",
            "Twice this number is what? Digits only.",
            "You double integers. Return the doubled value.",
            "Add the number to itself and tell me the result.",
            "What do you get from two times this number?",
            "Output: the number times two.",
        ],
    ),
    (
        "smallest",
        [
            "Pick the lowest value among the numbers and repeat it.",
            "Smallest number in the list? Just that number.",
            "You select minima. Return the least of these numbers.",
            "Tell me which of the numbers is the smallest one.",
            "Find the bottom value of the list.",
            "Output: the minimum.",
        ],
    ),
    (
        "add_three",
        [
            "Sum all three values and give only the result.",
            "Three numbers added together make what?",
            "You are a calculator: add up the three numbers.",
            "Combine the three numbers by adding them.",
            "Compute the total of the trio in digits.",
            "Output: the sum of the three numbers.",
        ],
    ),
    (
        "half",
        [
            "Divide the number by 2 and give the result.",
            "Half of this number is what? Digits only.",
            "You halve integers. Return half the value.",
            "Split the number into two equal parts and tell me one part.",
            "What do you get from this number over two?",
            "Output: the number divided by two.",
        ],
    ),
    (
        "plus_ten",
        [
            "Count ten up from the number and say where you land.",
            "Number plus ten? Digits only.",
            "You raise integers by ten. Return the result.",
            "Give the integer ten more than the one you see.",
            "Increase the value by 10 and write it.",
            "Output: the number increased by 10.",
        ],
    ),
];
