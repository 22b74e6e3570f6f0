//! The GPTQ and AWQ+GPTQ passes over one block (docs/GPTQ.md, "The pass").
//!
//! GPTQ rounds each linear against the Hessian of its captured inputs; with true-sequential
//! order the inputs of o_proj, gate/up and down_proj are captured again through the layers
//! already quantized, so each stage compensates the errors of the earlier ones. AWQ+GPTQ first
//! runs AWQ's search, folding and clipping ([`super::awq_fold`]) and rounds the scaled weights.
//! As in the GPTQ reference, the quantized block's output is the next block's input. With error
//! propagation the full-precision model runs beside it, one block at a time, and each layer is
//! rounded towards the weight that maps the quantized stream's inputs to the full-precision
//! outputs (docs/GPTQ.md, "Error propagation").
use super::gptq::{input_drift, propagation_target, quantize_layer, Hessian, Prepared, Quantizer};
use super::{awq_fold, chunked, clip, forward_capture, input_of, layer_output_mse, check_finite, scale, AwqOptions, LayerReport, Method, REPORT_TOKENS};
use crate::error::{Error, Result};
use crate::linear::QuantLinear;
use crate::model::{Block, BlockContext, LinearInputs, Proj};
use candle_core::{DType, Tensor};

/// The order true-sequential GPTQ quantizes a block in: each stage's inputs are captured
/// through the stages before it.
const STAGES: [&[Proj]; 4] = [&[Proj::Q, Proj::K, Proj::V], &[Proj::O], &[Proj::Gate, Proj::Up], &[Proj::Down]];

/// The layer whose captured input `p` reads (layers sharing an input share its Hessian).
fn reader(p: Proj) -> Proj {
    match p {
        Proj::Q | Proj::K | Proj::V => Proj::Q,
        Proj::Gate | Proj::Up => Proj::Gate,
        other => other,
    }
}

/// What the layers reading one captured input share within a stage.
struct ReaderPrep {
    reader: Proj,
    prep: Prepared,
    /// A token subsample of the input, for the report's errors.
    sample: Tensor,
    propagation: Option<Propagation>,
}

/// Error propagation's view of one captured input.
struct Propagation {
    /// How the quantized stream's inputs drifted from the full-precision ones ([`input_drift`]).
    drift: Tensor,
    /// A token subsample of the full-precision inputs, for the report's errors.
    fp_sample: Tensor,
}

/// GPTQ (or AWQ+GPTQ) for one block: returns the quantized block and its output on `x`, and
/// with error propagation (`x_fp`: the full-precision model's input to this block) the
/// full-precision block's output on `x_fp`.
#[allow(clippy::too_many_arguments)]
pub(super) fn gptq_block(block: &Block, idx: usize, x: &Tensor, x_fp: Option<&Tensor>, ctx: &BlockContext, dtype: DType, o: &AwqOptions, rec: &mut super::Records) -> Result<(Block, Tensor, Option<Tensor>)> {
    // The scales AWQ folded into each layer's columns: the full-precision inputs are divided by them.
    let (mut work, col_scale) = match o.method {
        Method::AwqGptq => {
            let f = awq_fold(block, idx, x, ctx, o, rec)?;
            (f.dense_block(block, dtype)?, f.col_scale)
        }
        Method::Gptq => (block.clone(), vec![None; Proj::ALL.len()]),
        m => return Err(Error::msg(format!("{}: not a GPTQ method", m.name()))),
    };
    let fp = x_fp.map(|xf| forward_capture(block, xf, ctx, o.batch)).transpose()?;
    let fp_input = |l: Proj| -> Result<Option<Tensor>> {
        let Some((_, caps)) = fp.as_ref() else { return Ok(None) };
        let xin = input_of(caps, l)?;
        Ok(Some(match &col_scale[l.index()] {
            Some(s) => xin.broadcast_div(s)?,
            None => xin,
        }))
    };
    let quantizer = Quantizer {
        scheme: o.params,
        sym: o.gptq.sym,
        // The GPTQ checkpoint stores zero - 1 (docs/GPTQ.md); AWQ+GPTQ writes the AWQ layout.
        min_zero: if o.method == Method::Gptq && !o.gptq.sym { 1.0 } else { 0.0 },
    };
    let all: [&[Proj]; 1] = [&Proj::ALL];
    let stages: &[&[Proj]] = if o.gptq.true_sequential { &STAGES } else { &all };
    let device = x.device().clone();
    let mut caps: Option<LinearInputs> = None;
    let mut reports = Vec::new();
    for stage in stages {
        if caps.is_none() || o.gptq.true_sequential {
            caps = Some(forward_capture(&work, x, ctx, o.batch)?.1);
        }
        let caps = caps.as_ref().ok_or_else(|| Error::msg("GPTQ: no captured inputs"))?;
        let mut prepared: Vec<ReaderPrep> = Vec::new();
        for &l in stage.iter() {
            let name = format!("model.layers.{idx}.{}", l.hf_name());
            let xin = input_of(caps, l)?;
            let r = reader(l);
            if !prepared.iter().any(|p| p.reader == r) {
                let h = Hessian::of_inputs(&xin).map_err(|e| Error::msg(format!("{name}: {e}")))?;
                let what = stage.iter().filter(|&&p| reader(p) == r).map(|p| format!("model.layers.{idx}.{}", p.hf_name())).collect::<Vec<_>>().join(", ");
                // Layers that share an input share its propagation setting (only down_proj differs).
                let propagates = l != Proj::Down || o.gptq.propagate_down;
                let fp_in = if propagates { fp_input(l)? } else { None };
                let propagation = fp_in
                    .map(|xf| -> Result<Propagation> {
                        Ok(Propagation {
                            drift: input_drift(&xf, &xin).map_err(|e| Error::msg(format!("{name}: {e}")))?,
                            fp_sample: clip::subsample_tokens(&xf, REPORT_TOKENS)?,
                        })
                    })
                    .transpose()?;
                let sample = clip::subsample_tokens(&xin, REPORT_TOKENS)?;
                prepared.push(ReaderPrep { reader: r, prep: Prepared::new(&h, &o.gptq, &what)?, sample, propagation });
            }
            let ReaderPrep { prep, sample: xs, propagation, .. } = prepared.iter().find(|p| p.reader == r).ok_or_else(|| Error::msg("GPTQ: Hessian not prepared"))?;
            let lin = work.linear(l).clone();
            let w = lin.dense_weight()?.to_dtype(DType::F32)?;
            let target = match propagation {
                Some(p) => propagation_target(&w, &p.drift, prep, o.gptq.propagate).map_err(|e| Error::msg(format!("{name}: {e}")))?,
                None => w.clone(),
            };
            let q = quantize_layer(&target, prep, &quantizer, &o.gptq, &device).map_err(|e| Error::msg(format!("{name}: {e}")))?;
            let bias = lin.bias().map(|b| b.to_dtype(DType::F16)?.to_dtype(DType::F32)).transpose()?;
            let mut ql = QuantLinear::new(q.weight, bias, dtype, &device)?;
            if let Some(perm) = q.perm {
                ql = ql.with_input_perm(perm)?;
            }
            let ql = ql.into_linear();
            // The layer's error on its own (subsampled) inputs: round-to-nearest and GPTQ; under
            // error propagation against the full-precision layer on the full-precision inputs.
            let want = match propagation {
                Some(p) => p.fp_sample.matmul(&w.t()?)?,
                None => xs.matmul(&w.t()?)?,
            };
            reports.push(LayerReport {
                block: idx,
                layer: l.name().to_string(),
                clip_shrink: None,
                output_mse_rtn: layer_output_mse(xs, &w, &w, None, None, o.params)?,
                output_mse: scale::mse(&xs.matmul(&ql.dense_weight()?.t()?)?, &want)?,
                hessian_trace: Some(prep.trace),
                gptq_loss: Some(q.loss),
                damp: Some(prep.damp),
            });
            *work.linear_mut(l) = ql;
        }
    }
    reports.sort_by_key(|r| Proj::ALL.iter().position(|p| p.name() == r.layer));
    rec.layers.extend(reports);
    let y = chunked(x, o.batch, |xc| work.forward(xc, ctx, None, None))?;
    check_finite(&y, &format!("block {idx} output"))?;
    Ok((work, y, fp.map(|(y_fp, _)| y_fp)))
}
