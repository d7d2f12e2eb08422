# Pick-and-Draw DreamBench harness. `just --list` shows every recipe.

default:
    @just --list

# Run the whole test suite (what CI runs).
test:
    cargo test --workspace

# Verify a DreamBench copy (default: the shared one beside the checkout).
check-data data="../shared/dreambench":
    cargo run --release -p runner --bin pnd -- dataset check --data {{data}}

# Download DreamBench from google/dreambooth and verify it.
fetch-data dest="dreambench":
    cargo run --release -p runner --bin pnd -- dataset fetch --dest {{dest}}

# List subjects, classes, image counts and prompts.
list data="../shared/dreambench":
    cargo run --release -p runner --bin pnd -- dataset list --data {{data}}

# Regenerate the parity fixtures (needs the Python reference stack, see README).
fixtures:
    for f in tools/fixtures/*.py; do ~/.venvs/ref/bin/python "$f"; done
