//! `irsa-imds-cni`: a chained CNI plugin that registers each pod's IPs with the irsa-imds agent
//! at sandbox creation (ADD) and removes them at teardown (DEL), closing the race at pod start
//! and IP reuse. It passes `prevResult` through untouched and never breaks pod networking
//! because the agent is down, unless the operator chose `failClosed`.
//!
//! Modes: with `CNI_COMMAND` set it is a CNI plugin (config on stdin, result or error JSON on
//! stdout, logs on stderr or `logFile`); `irsa-imds-cni install|uninstall [flags]` chains it into
//! the node's conflist.

mod install;

use std::io::Read;

use clap::{CommandFactory, Parser};
use irsa_imds_cni::cni;

fn main() {
    let cli = match install::Cli::try_parse() {
        Ok(c) => c,
        // Help and version on stdout with exit 0; a bad flag names itself, exit 2.
        Err(e) => e.exit(),
    };
    match cli.command {
        Some(install::Cmd::Install(a)) => exit_with(install::install(a)),
        Some(install::Cmd::Uninstall(a)) => exit_with(install::uninstall(a)),
        None if std::env::var_os("CNI_COMMAND").is_some() => {
            // The runtime's config: bounded, so a hostile stdin cannot exhaust memory.
            let mut stdin = Vec::new();
            let read = std::io::stdin()
                .take(cni::MAX_CONFIG + 1)
                .read_to_end(&mut stdin);
            let env = cni::Env::from_process();
            let outcome = match read {
                Ok(n) if n as u64 > cni::MAX_CONFIG => Err(cni::CniError::new(
                    cni::code::DECODE,
                    "network config too large",
                    format!("over {} bytes", cni::MAX_CONFIG),
                )),
                Ok(_) => cni::run(&env, &stdin),
                Err(e) => Err(cni::CniError::new(
                    cni::code::IO,
                    "cannot read stdin",
                    e.to_string(),
                )),
            };
            match outcome {
                Ok(Some(out)) => println!("{out}"),
                Ok(None) => {}
                Err(e) => {
                    println!("{}", e.to_json(cni::requested_version(&stdin)));
                    std::process::exit(1);
                }
            }
        }
        None => {
            eprintln!(
                "irsa-imds-cni: CNI_COMMAND is not set: this is a CNI plugin, run by the container runtime\n\n{}",
                install::Cli::command().render_help()
            );
            std::process::exit(2);
        }
    }
}

fn exit_with(r: Result<String, String>) {
    match r {
        Ok(msg) => eprintln!("irsa-imds-cni: {msg}"),
        Err(e) => {
            eprintln!("irsa-imds-cni: {e}");
            std::process::exit(1);
        }
    }
}
