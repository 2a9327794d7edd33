//! netredirctl: asks netredird over its control socket and prints the
//! answer for people (tables) or programs (`--json`).

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use netredir_shared::control::{DEFAULT_CONTROL_PATH, MapEntry, Request, Response, request};
use std::path::PathBuf;
use std::time::Duration;

/// Shows and manages what netredird redirects.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Args {
    /// netredird's control socket (its --control).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONTROL_PATH)]
    control: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Resources and their virtual IPs.
    Map {
        #[command(subcommand)]
        cmd: MapCmd,
    },
    /// The session: agent, flows, counters.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MapCmd {
    /// One row per resource: name, virtual IP, real address, state.
    List {
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("netredirctl: {e:#}");
        std::process::exit(1);
    }
}

fn ask(args: &Args, req: Request) -> Result<Response> {
    match request(&args.control, &req, Duration::from_secs(5))? {
        Response::Error { message } => bail!("netredird: {message}"),
        r => Ok(r),
    }
}

fn run(args: Args) -> Result<()> {
    match &args.cmd {
        Cmd::Map {
            cmd: MapCmd::List { json },
        } => {
            let Response::Map { entries } = ask(&args, Request::MapList)? else {
                bail!("netredird answered map list with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                print!("{}", table(&entries));
            }
        }
        Cmd::Status { json } => {
            let Response::Status(st) = ask(&args, Request::Status)? else {
                bail!("netredird answered status with something else");
            };
            if *json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!("interface  {}", st.iface);
                println!("subnet     {}", st.subnet);
                match &st.agent_name {
                    Some(n) if st.agent_connected => println!("agent      {n} (connected)"),
                    _ => println!("agent      none connected"),
                }
                println!("flows      {}", st.flows);
                for (k, v) in st.counters.iter().filter(|(_, v)| *v > 0) {
                    println!("  {k:<32} {v}");
                }
            }
        }
    }
    Ok(())
}

fn table(entries: &[MapEntry]) -> String {
    if entries.is_empty() {
        return "no resources (is an agent connected and exporting?)\n".into();
    }
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            let ports: Vec<String> = e.ports.iter().map(u16::to_string).collect();
            [
                e.name.clone(),
                e.vip.clone(),
                e.target.clone(),
                ports.join(","),
                e.state.clone(),
            ]
        })
        .collect();
    let head = ["NAME", "VIRTUAL IP", "TARGET", "PORTS", "STATE"].map(String::from);
    let mut w = [0usize; 5];
    for r in std::iter::once(&head).chain(&rows) {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(&head).chain(&rows) {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<0$}", w[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lines_up_columns() {
        let t = table(&[MapEntry {
            name: "printer".into(),
            vip: "100.77.12.34".into(),
            target: "10.0.0.5:9100".into(),
            ports: vec![9100],
            state: "online".into(),
        }]);
        assert_eq!(
            t,
            "NAME     VIRTUAL IP    TARGET         PORTS  STATE\n\
             printer  100.77.12.34  10.0.0.5:9100  9100   online\n"
        );
        assert!(table(&[]).contains("no resources"));
    }
}
