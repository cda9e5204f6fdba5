//! Small helpers shared by the router's benchmark binaries (`src/bin/bench_*.rs`); not part of
//! the router's API.

/// The number after `name` on the command line (`--inputs 500000`), or `default`.
pub fn argument(name: &str, default: f64) -> f64 {
    let arguments: Vec<String> = std::env::args().collect();
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|index| arguments.get(index + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// Whether `name` is on the command line (`--growing`).
pub fn flag(name: &str) -> bool {
    std::env::args().any(|argument| argument == name)
}
