//! Lists of subjects, prompt indices and seeds given on a command line or in an experiment file:
//! a value listed twice would score or generate the same image twice and count it twice (n and
//! the intervals wrong), so every list is refused with one message whatever the command.

use std::fmt::Display;

/// The 0-based positions of the first value that `items` lists twice (first and second place).
pub fn first_duplicate<T: PartialEq>(items: &[T]) -> Option<(usize, usize)> {
    items
        .iter()
        .enumerate()
        .find_map(|(i, x)| items[..i].iter().position(|y| y == x).map(|j| (j, i)))
}

/// `Err("{list} lists {noun} {value} twice (positions a and b)")` (1-based) for the first value
/// listed twice, e.g. `--seeds lists seed 0 twice (positions 1 and 2)`.
pub fn check_unique<T: PartialEq + Display>(
    list: &str,
    noun: &str,
    items: &[T],
) -> Result<(), String> {
    match first_duplicate(items) {
        Some((a, b)) => Err(format!(
            "{list} lists {noun} {} twice (positions {} and {})",
            items[b],
            a + 1,
            b + 1
        )),
        None => Ok(()),
    }
}

/// `"1 subject"`, `"3 subjects"`: a count with its noun in the right number (nouns with a plain
/// plural `s`).
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_repeated_value_is_named_with_both_positions() {
        assert_eq!(first_duplicate(&[3, 1, 2]), None);
        assert_eq!(first_duplicate::<u64>(&[]), None);
        assert_eq!(first_duplicate(&[0, 5, 0, 5]), Some((0, 2)));
        assert_eq!(first_duplicate(&[1, 2, 2, 1]), Some((1, 2)));
        assert_eq!(
            check_unique("--seeds", "seed", &[0u64, 0]).unwrap_err(),
            "--seeds lists seed 0 twice (positions 1 and 2)"
        );
        assert_eq!(
            check_unique("--subjects", "subject", &["dog", "cat", "dog"]).unwrap_err(),
            "--subjects lists subject dog twice (positions 1 and 3)"
        );
        assert!(check_unique("--prompts", "prompt", &[0usize, 20]).is_ok());
    }

    #[test]
    fn counts_take_the_singular_for_one() {
        assert_eq!(count(1, "subject"), "1 subject");
        assert_eq!(count(0, "subject"), "0 subjects");
        assert_eq!(count(30, "subject"), "30 subjects");
    }
}
