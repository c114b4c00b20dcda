//! `lockbroker`: the command-line tool; the program is [`lockbroker_cli::main`].

fn main() -> std::process::ExitCode {
    lockbroker_cli::main()
}
