//! The `lockbroker` tool, built in this package so that its tests find it
//! as `CARGO_BIN_EXE_lb-cli` (cargo builds it before they run).

fn main() -> std::process::ExitCode {
    lockbroker_cli::main()
}
