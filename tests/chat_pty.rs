//! `chat` in a real pseudo-terminal, as a terminal user meets it: a line pasted in one write
//! (text and Enter together) is answered without another key press, a bracketed multi-line paste
//! is one message, Ctrl-C stops a reply, Ctrl-D exits.
#![cfg(unix)]
mod common;
use awq_run::model::Arch;
use common::{bin, TinySpec};
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The terminal's two ends: the master (our side) and the slave (the program's).
fn openpty() -> (std::fs::File, OwnedFd) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize { ws_row: 40, ws_col: 200, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: out-pointers to live locals; no name buffer or termios requested.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
    assert_eq!(r, 0, "openpty failed: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened and are owned here alone.
    unsafe { (std::fs::File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) }
}

struct Session {
    master: std::fs::File,
    output: mpsc::Receiver<Vec<u8>>,
    seen: String,
    child: std::process::Child,
}

impl Session {
    fn start(model: &std::path::Path, extra: &[&str]) -> Self {
        let (master, slave) = openpty();
        let mut args = vec!["chat", "--model", model.to_str().unwrap(), "--show-prompt", "--temperature", "0"];
        args.extend_from_slice(extra);
        let mut cmd = Command::new(bin());
        // SAFETY: async-signal-safe calls only, between fork and exec: the child leads a new
        // session whose controlling terminal is the pty (its stdin), so Ctrl-C there is SIGINT.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .args(&args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave))
            .spawn()
            .unwrap();
        let mut reader = master.try_clone().unwrap();
        let (tx, output) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Self { master, output, seen: String::new(), child }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).unwrap();
    }

    /// Waits (at most 30 s) until output not yet taken by [`Session::expect`] holds more than
    /// whitespace (the line end of the text `expect` last matched, say).
    fn expect_some(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seen.trim().is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("timed out waiting for any output"),
            }
        }
    }

    /// Waits (at most 30 s) until the output since the last call holds `what`; returns it.
    fn expect(&mut self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.seen.contains(what) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.output.recv_timeout(left) {
                Ok(b) => self.seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("timed out waiting for {what:?}; the terminal shows:\n{}", self.seen),
            }
        }
        let at = self.seen.find(what).unwrap() + what.len();
        let got = self.seen[..at].to_string();
        self.seen.drain(..at);
        got
    }
}

#[test]
fn pasted_lines_are_answered_at_once_and_keys_work() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = TinySpec::new(Arch::Llama).write_dir(tmp.path());
    let mut s = Session::start(&dir, &["--max-tokens", "3"]);
    s.expect(">>> ");
    // Text and Enter in one write, as a terminal paste or `tmux send-keys "text" Enter` delivers it.
    s.send(b"pasted question\r");
    let out = s.expect("generation:");
    assert!(out.contains("user\r\npasted question<|im_end|>") || out.contains("user\npasted question<|im_end|>"), "{out}");
    s.expect(">>> ");
    // A bracketed paste of two lines is one message.
    s.send(b"\x1b[200~line one\nline two\x1b[201~\r");
    let out = s.expect("generation:");
    assert!(out.contains("line one") && out.contains("line two"), "{out}");
    assert_eq!(out.matches("--- prompt ---").count(), 1, "{out}");
    s.expect(">>> ");
    s.send(b"\x04"); // Ctrl-D
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = s.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "chat did not exit on Ctrl-D");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
}

#[test]
fn ctrl_c_stops_a_reply_and_the_prompt_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = TinySpec::new(Arch::Llama);
    spec.max_pos = 24576;
    let dir = spec.write_dir(tmp.path());
    // A reply long enough to interrupt (the tiny model rarely ends on its own): 20000 tokens take
    // over a second on a fast machine, where 3000 after a fixed 300 ms wait were once all out
    // (11.8k tok/s) before the Ctrl-C came.
    let mut s = Session::start(&dir, &["--max-tokens", "20000"]);
    s.expect(">>> ");
    s.send(b"tell me everything\r");
    s.expect("--- end of prompt ---");
    // Interrupt once the reply has started streaming (the stop flag is cleared before its first
    // token, so a Ctrl-C sent earlier could be forgotten).
    s.expect_some();
    s.send(b"\x03"); // Ctrl-C
    let out = s.expect(">>> ");
    assert!(out.contains("(stopped)"), "{out}");
    s.send(b"/exit\r");
    let deadline = Instant::now() + Duration::from_secs(30);
    while s.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "chat did not exit on /exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
