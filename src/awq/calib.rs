//! Calibration data, cut the way the reference does (docs/AWQ.md, "Calibration data"): each record (a
//! non-empty line) is tokenized, records longer than one block are skipped, the rest are
//! concatenated and cut into blocks of `seqlen` tokens.
use crate::error::{Error, Result};
use crate::assets::ModelAssets;
use std::path::Path;

/// Reads a UTF-8 text file, naming it in errors.
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = crate::error::read_file(path)?;
    String::from_utf8(bytes).map_err(|e| {
        Error::msg(format!("{}: not valid UTF-8 (first bad byte at offset {})", path.display(), e.utf8_error().valid_up_to()))
    })
}

/// Up to `n_blocks` blocks of `seqlen` tokens from `path`.
pub fn calibration_blocks(assets: &ModelAssets, path: &Path, n_blocks: usize, seqlen: usize) -> Result<Vec<Vec<u32>>> {
    if n_blocks == 0 || seqlen == 0 {
        return Err(Error::msg("--n-samples and --seqlen must be positive"));
    }
    let text = read_text(path)?;
    let mut stream: Vec<u32> = Vec::new();
    let need = n_blocks * seqlen;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let ids = assets.encode(line, true)?;
        if ids.len() > seqlen {
            continue;
        }
        stream.extend(ids);
        if stream.len() >= need {
            break;
        }
    }
    let blocks: Vec<Vec<u32>> = stream.chunks_exact(seqlen).take(n_blocks).map(<[u32]>::to_vec).collect();
    if blocks.is_empty() {
        return Err(Error::msg(format!(
            "calibration text {} is shorter than one block: {} usable tokens (records of at most {seqlen} tokens) for --seqlen {seqlen}",
            path.display(),
            stream.len()
        )));
    }
    Ok(blocks)
}
