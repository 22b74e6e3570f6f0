//! The crate's rooms import only downward (docs/ARCHITECTURE.md): every `crate::ROOM` a source
//! file names (outside comments) must be its own room or one of a lower rank. A new top-level
//! module must be given a rank here and a row in ARCHITECTURE.md.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each library room and its rank; a room may import rooms of strictly lower rank only.
const RANKS: &[(&str, u32)] = &[
    ("server", 8),
    ("awq", 7),
    ("engine", 7),
    ("selftest", 7),
    ("assets", 6),
    ("checkpoint", 5),
    ("model", 4),
    ("linear", 3),
    ("quant", 2),
    ("cuda", 1),
    ("error", 0),
    ("rng", 0),
];

/// Names re-exported at the crate root, and the room they live in.
const ROOT_REEXPORTS: &[(&str, &str)] = &[("Error", "error"), ("Result", "error"), ("ModelAssets", "assets"), ("bail", "error")];

fn rank(room: &str) -> Option<u32> {
    RANKS.iter().find(|(r, _)| *r == room).map(|(_, k)| *k)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The rooms a source text names through `crate::` paths (comments removed; macros skipped).
fn rooms_named(text: &str) -> BTreeSet<String> {
    let mut rooms = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            rest = after;
            // `use crate::{a::x, b}`: every top-level name in the braces.
            let names: Vec<&str> = if let Some(inner) = after.strip_prefix('{') {
                let end = inner.find('}').unwrap_or(inner.len());
                inner[..end].split(',').map(|s| s.trim().split("::").next().unwrap_or("").trim()).collect()
            } else {
                let end = after.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(after.len());
                if after[end..].starts_with('!') {
                    continue; // an exported macro, not a module
                }
                vec![&after[..end]]
            };
            for n in names.into_iter().filter(|n| !n.is_empty()) {
                let room = ROOT_REEXPORTS.iter().find(|(name, _)| *name == n).map_or(n, |(_, r)| *r);
                rooms.insert(room.to_string());
            }
        }
    }
    rooms
}

#[test]
fn rooms_import_only_downward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut back_edges = Vec::new();
    let mut edges = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
        let room = first.trim_end_matches(".rs").to_string();
        if room == "lib" || room == "main" || room == "cli" {
            continue; // the root and the binary sit above every room
        }
        let Some(own) = rank(&room) else {
            back_edges.push(format!("{}: room {room:?} has no rank in tests/architecture.rs", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for named in rooms_named(&text) {
            if named == room {
                continue;
            }
            edges.insert(format!("{room} -> {named}"));
            match rank(&named) {
                Some(r) if r < own => {}
                Some(r) => back_edges.push(format!("{}: {room} (rank {own}) imports {named} (rank {r})", rel.display())),
                None => back_edges.push(format!("{}: names crate::{named}, which is no room", rel.display())),
            }
        }
    }
    println!("import graph:\n{}", edges.iter().cloned().collect::<Vec<_>>().join("\n"));
    assert!(back_edges.is_empty(), "imports against the layering:\n{}", back_edges.join("\n"));
}

#[test]
fn the_scanner_sees_paths_groups_and_skips_comments() {
    let text = "use crate::{quant::format, cuda::L2Prefetch};\nlet x = crate::model::Proj::Q; // crate::awq\ncrate::with_float_type!(dt, T => ());\n/// see [`crate::engine`]\nlet e: crate::Result<()>;";
    let rooms: Vec<String> = rooms_named(text).into_iter().collect();
    assert_eq!(rooms, ["cuda", "error", "model", "quant"]);
}
