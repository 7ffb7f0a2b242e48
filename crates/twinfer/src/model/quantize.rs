//! In-situ quantization: a model loaded with float weights (f32, f16 or bf16 safetensors, or a
//! random preset) gets its projections quantized at load, as mistral.rs's ISQ and candle do.
//! Every projection (q/k/v, o, gate/up, down and the LM head) becomes block-quantized; the
//! embedding table, the norms and the biases stay as stored. A tied LM head, which is also the
//! embedding table, becomes one Q8_0 copy that serves both the lookup and the logits (llama.cpp
//! also keeps output matrices at higher precision; SmolLM2's Q4_1 GGUF ships its tied table in
//! Q8_0): the float table is not kept beside it. `model::stream` applies the same rule.
//!
//! A model can also be rounded to bf16 (every projection and the embedding table, as a bf16
//! file would hold them): bf16 weights take bf16 activations, which CPUs with bf16 dot products
//! multiply twice as fast as f32 (`cpu::linear`), at the cost of both roundings.

use std::sync::Arc;

use crate::cpu::ActivationCodes;
use crate::error::{Result, TwinferError};
use crate::model::elems::Elems;
use crate::model::linear::Linear;
use crate::model::llama::LlamaModel;
use crate::model::weights::WeightData;
use crate::quant::{BLOCK, PackedQuant, QuantFormat, QuantRows};

/// What a float model's projections become at load (`--quantize`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// bf16, computed with the activations rounded to bf16 (see the module's notes).
    Bf16,
    /// A block format that float weights quantize into ([`QuantFormat::can_quantize`]).
    Block(QuantFormat),
}

impl From<QuantFormat> for WeightFormat {
    fn from(format: QuantFormat) -> Self {
        Self::Block(format)
    }
}

impl WeightFormat {
    /// The name `--quantize` takes: `bf16`, or the block format's (`q4_1`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bf16 => "bf16",
            Self::Block(format) => format.name(),
        }
    }

    /// Looks a format up by [`WeightFormat::name`].
    pub fn parse(name: &str) -> Result<Self> {
        if name.eq_ignore_ascii_case("bf16") {
            return Ok(Self::Bf16);
        }
        QuantFormat::parse(name).map(Self::Block)
    }
}

impl Linear {
    /// This projection with its weights quantized to `format` (unchanged when it already is
    /// block-quantized). The input width must be a multiple of 32.
    pub fn quantized(&self, format: QuantFormat, name: &str) -> Result<Self> {
        if self.quant_parts().is_some() {
            return Ok(self.clone());
        }
        if !self.k.is_multiple_of(BLOCK) {
            return Err(TwinferError::InvalidParameter(format!(
                "{name}: {} inputs are not whole blocks of {BLOCK}, so it cannot be quantized",
                self.k
            )));
        }
        let rows = QuantRows::quantize(format, &self.to_f32(), self.n, self.k)?;
        let w = Arc::new(WeightData::Quant(PackedQuant::from_rows(&rows)?));
        let mut quantized = Linear::new(w, self.bias.clone(), self.n, self.k);
        quantized.activations = self.activations;
        Ok(quantized)
    }
}

impl Linear {
    /// This projection with its float weights rounded to bf16 (to nearest, ties to even); stacked
    /// parts stay apart, block-quantized weights stay as they are.
    pub fn in_bf16(&self) -> Self {
        let parts = self.parts.iter().map(in_bf16).collect();
        Self {
            parts,
            bias: self.bias.clone(),
            n: self.n,
            k: self.k,
            device: Default::default(),
            cpu: Default::default(),
            activations: self.activations,
        }
    }
}

/// `w` rounded to bf16 if it is float and not bf16 already.
fn in_bf16(w: &Arc<WeightData>) -> Arc<WeightData> {
    match &**w {
        WeightData::BF16(_) | WeightData::Quant(_) => w.clone(),
        float => {
            let rounded = float.to_f32().into_iter().map(half::bf16::from_f32).collect();
            Arc::new(WeightData::BF16(Elems::owned(rounded)))
        }
    }
}

impl LlamaModel {
    /// Converts every projection to `format`, one matrix at a time (the float copy of each is
    /// dropped as its new copy is made, so peak memory stays near the float model's).
    pub fn quantize(&mut self, format: impl Into<WeightFormat>) -> Result<()> {
        let format = match format.into() {
            WeightFormat::Bf16 => return self.round_to_bf16(),
            WeightFormat::Block(format) => format,
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            layer.qkv = layer.qkv.quantized(format, &format!("layer {i} qkv"))?;
            layer.o = layer.o.quantized(format, &format!("layer {i} o_proj"))?;
            layer.gate_up = layer.gate_up.quantized(format, &format!("layer {i} gate_up"))?;
            layer.down = layer.down.quantized(format, &format!("layer {i} down_proj"))?;
        }
        let tied = matches!(&self.lm_head.parts[..], [w] if Arc::ptr_eq(w, &self.embed));
        if tied {
            self.lm_head = self.lm_head.quantized(QuantFormat::Q8_0, "tied embeddings and LM head")?;
            self.embed = self.lm_head.parts[0].clone();
        } else {
            self.lm_head = self.lm_head.quantized(format, "lm_head")?;
        }
        Ok(())
    }
}

impl LlamaModel {
    /// Sets how every block-quantized projection (the LM head too) quantizes its activations in
    /// CPU products; float projections and GPU kernels are unaffected.
    pub fn set_activations(&mut self, codes: ActivationCodes) {
        for layer in &mut self.layers {
            for linear in [&mut layer.qkv, &mut layer.o, &mut layer.gate_up, &mut layer.down] {
                linear.activations = codes;
            }
        }
        self.lm_head.activations = codes;
    }
}

impl LlamaModel {
    /// Rounds every projection, and the embedding table, to bf16.
    fn round_to_bf16(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for linear in [&mut layer.qkv, &mut layer.o, &mut layer.gate_up, &mut layer.down] {
                *linear = linear.in_bf16();
            }
        }
        let tied = matches!(&self.lm_head.parts[..], [w] if Arc::ptr_eq(w, &self.embed));
        self.lm_head = self.lm_head.in_bf16();
        self.embed = if tied { self.lm_head.parts[0].clone() } else { in_bf16(&self.embed) };
        Ok(())
    }
}
