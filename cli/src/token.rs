//! `claw token new`: a random API token and the lines that list it in the gateway's tokens
//! file (`--tokens`). The file holds only the token's SHA-256, so it is not itself a secret
//! worth stealing; the token is printed once, here.

use crate::error::{EXIT_OK, EXIT_UNAVAILABLE};

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Print a new random token and its entry for the tokens file.
    New {
        /// The principal the token is for (its table name in the tokens file).
        principal: String,
        /// Mark the principal as an admin (sees every task and session, may pause lanes).
        #[arg(long)]
        admin: bool,
    },
}

pub fn run(command: TokenCommand) -> u8 {
    match command {
        TokenCommand::New { principal, admin } => match claw_gateway::auth::generate() {
            Ok((token, line)) => {
                println!("# The token: give it to {principal}; it is not shown again.");
                println!("{token}");
                println!("# For the tokens file (add the sha256 entry to an existing table):");
                println!("[principals.{principal}]");
                println!("{line}");
                if admin {
                    println!("admin = true");
                }
                EXIT_OK
            }
            Err(e) => {
                eprintln!("claw: {e}");
                EXIT_UNAVAILABLE
            }
        },
    }
}
