//! `chatctl`: the command-line client of chatd's admin API.

fn main() {
    eprintln!("chatctl: the admin API is not implemented yet");
    std::process::exit(1);
}
