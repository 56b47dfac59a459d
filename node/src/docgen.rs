//! Documents generated from the command-line definition itself, so they never drift from it:
//! shell completion scripts (`meshnode completions SHELL`) and the man page (`meshnode man`),
//! which the Debian package installs (deploy/debian/build-deb.sh).

use std::io::Write;

use clap::CommandFactory;

use crate::cli::Cli;
use crate::exit::{self, Failure};

/// Writes the completion script for `shell` to stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<(), Failure> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "meshnode", &mut out);
    write_stdout(&out)
}

/// Writes the man page meshnode(1) (roff) to stdout: every subcommand with its flags.
pub fn man() -> Result<(), Failure> {
    let cmd = Cli::command();
    let mut out = Vec::new();
    render_man(&cmd, &mut out)
        .map_err(|e| Failure::new(exit::SOFTWARE, format!("man page: {e}")))?;
    write_stdout(&out)
}

/// The top-level page, then one section per subcommand (clap_mangen renders one command per
/// page; a single page with every subcommand is what `man meshnode` readers expect).
fn render_man(cmd: &clap::Command, out: &mut Vec<u8>) -> std::io::Result<()> {
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_subcommand(sub, &format!("meshnode {}", sub.get_name()), out)?;
    }
    man.render_extra_section(out)?;
    writeln!(
        out,
        ".SH FILES\n.TP\n/etc/meshnode/meshnode.toml\nThe node's config (TOML); `meshnode validate` checks it.\n\
         .TP\n/var/lib/meshnode\nnode.state_dir: keys that let peers detect a restart at once.\n\
         .SH \"EXIT STATUS\"\n0 success, 64 usage, 69 unavailable, 74 I/O error, 78 bad config.\n\
         .SH \"SEE ALSO\"\nThe user reference in the project's docs/ directory; systemctl(1), etcd(1)."
    )?;
    man.render_version_section(out)?;
    man.render_authors_section(out)
}

fn render_subcommand(cmd: &clap::Command, path: &str, out: &mut Vec<u8>) -> std::io::Result<()> {
    let subs: Vec<&clap::Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if subs.is_empty() {
        writeln!(out, ".SH \"{}\"", path.to_uppercase())?;
        if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
            writeln!(out, "{}", roff_escape(&about.to_string()))?;
        }
        let page = clap_mangen::Man::new(cmd.clone().bin_name(path.to_string()));
        let mut section = Vec::new();
        page.render_synopsis_section(&mut section)?;
        page.render_options_section(&mut section)?;
        // Inside a subcommand's section its synopsis and options are subsections.
        let section = String::from_utf8_lossy(&section)
            .replace(".SH SYNOPSIS", ".SS Synopsis")
            .replace(".SH OPTIONS", ".SS Options");
        out.extend_from_slice(section.as_bytes());
    }
    for sub in subs {
        render_subcommand(sub, &format!("{path} {}", sub.get_name()), out)?;
    }
    Ok(())
}

/// roff treats a leading `.` or `'` as a request and `\` as an escape.
fn roff_escape(text: &str) -> String {
    let text = text.replace('\\', "\\\\");
    match text.chars().next() {
        Some('.') | Some('\'') => format!("\\&{text}"),
        _ => text,
    }
}

fn write_stdout(bytes: &[u8]) -> Result<(), Failure> {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|()| stdout.flush())
        .map_err(|e| Failure::new(exit::IO, format!("stdout: {e}")))
}
