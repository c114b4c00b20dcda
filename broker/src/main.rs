//! `lockbrokerd`: the daemon; the program is [`lockbrokerd::program`].

fn main() -> std::process::ExitCode {
    lockbrokerd::program::main()
}
