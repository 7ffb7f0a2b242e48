//! In-situ quantization: a model loaded with float weights (f32, f16 or bf16 safetensors, or a
//! random preset) gets its projections quantized at load, as mistral.rs's ISQ and candle do.
//! Every projection (q/k/v, o, gate/up, down and the LM head) becomes block-quantized; the
//! embedding table, the norms and the biases stay as stored. A tied LM head, which is also the
//! embedding table, becomes one Q8_0 copy that serves both the lookup and the logits (llama.cpp
//! also keeps output matrices at higher precision; SmolLM2's Q4_1 GGUF ships its tied table in
//! Q8_0): the float table is not kept beside it. `model::stream` applies the same rule.

use std::sync::Arc;

use crate::error::{Result, TwinferError};
use crate::model::linear::Linear;
use crate::model::llama::LlamaModel;
use crate::model::weights::WeightData;
use crate::quant::{BLOCK, PackedQuant, QuantFormat, QuantRows};

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
        Ok(Linear::new(w, self.bias.clone(), self.n, self.k))
    }
}

impl LlamaModel {
    /// Quantizes every projection to `format`, one matrix at a time (the float copy of each is
    /// dropped as its quantized copy is made, so peak memory stays near the float model's).
    pub fn quantize(&mut self, format: QuantFormat) -> Result<()> {
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
