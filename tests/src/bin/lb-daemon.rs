//! `lockbrokerd`, built in this package so that its tests find it as
//! `CARGO_BIN_EXE_lb-daemon` (cargo builds it before they run).

fn main() -> std::process::ExitCode {
    lockbrokerd::program::main()
}
