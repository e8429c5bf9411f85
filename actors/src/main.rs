//! `plipd`: see `plipd --help`.

fn main() -> std::process::ExitCode {
    plip_actors::cli::main()
}
