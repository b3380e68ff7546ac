//! Error messages that may quote data: serde's, about a document from outside or a stored
//! event, can hold a passport number or a name. What reaches an answer, a log or a stored error
//! goes through here.

/// serde's message without the values it quotes: what was wrong and what was expected, which
/// name only the schema (and the keys of unknown or missing fields).
pub fn serde_message(message: &str) -> String {
    // The last ", expected": a value may hold those words itself, the schema's part comes last.
    let (said, expected) = match message.rfind(", expected") {
        Some(i) => message.split_at(i),
        None => (message, ""),
    };
    // Unknown and missing fields name the schema's (or the caller's) keys, not values.
    if said.starts_with("unknown field") || said.starts_with("missing field") {
        return message.to_string();
    }
    // What serde says about the value comes before it; the value is quoted (with "..." or
    // `...`) and may hold quotes of its own, so everything from the first quote on goes.
    let said = match said.find(['`', '"']) {
        Some(i) => &said[..i],
        None => said,
    };
    format!("{}{expected}", said.trim_end())
}

#[cfg(test)]
mod tests {
    use super::serde_message;

    #[test]
    fn serde_messages_lose_the_values_they_quote_and_keep_the_schema() {
        for (said, shown) in [
            (
                "invalid type: integer `784199012345671`, expected a string at line 1 column 30",
                "invalid type: integer, expected a string at line 1 column 30",
            ),
            (
                "invalid value: string \"P1234567\", expected a UUID",
                "invalid value: string, expected a UUID",
            ),
            (
                "unknown variant `P1234567`, expected one of `rental`, `chauffeur`",
                "unknown variant, expected one of `rental`, `chauffeur`",
            ),
            (
                "unknown field `tier`, expected `name` or `email`",
                "unknown field `tier`, expected `name` or `email`",
            ),
            ("missing field `start_at`", "missing field `start_at`"),
            // Values that hold quotes, backticks or serde's own words.
            (
                "unknown variant `P1, expected 784199012345671`, expected one of `rental`",
                "unknown variant, expected one of `rental`",
            ),
            (
                "unknown variant `x`784199012345671`, expected one of `rental`",
                "unknown variant, expected one of `rental`",
            ),
            (
                "invalid value: string \"a \\\" 784199012345671\", expected a UUID",
                "invalid value: string, expected a UUID",
            ),
        ] {
            assert_eq!(serde_message(said), shown);
        }
    }
}
