//! The GGUF reader's byte cursor: every read is checked against the end of the file, and every
//! count against the bytes left, before anything is allocated for it.

use super::gguf::{MAX_ARRAY_DEPTH, MetaValue};
use crate::error::{Result, TwinferError};

/// A bounds-checked little-endian reader over the file's bytes.
pub(super) struct Cursor<'a> {
    pub bytes: &'a [u8],
    pub at: usize,
    pub file: &'a str,
}

impl Cursor<'_> {
    pub fn bad(&self, reason: String) -> TwinferError {
        TwinferError::ModelFile { file: self.file.into(), reason }
    }

    pub fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or_else(|| {
            self.bad(format!("truncated: {n} bytes wanted at byte {}, the file has {}", self.at, self.bytes.len()))
        })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    /// A count of items that each take at least `min_item_bytes`: larger than the rest of the
    /// file could hold is an error before anything is allocated for it.
    pub fn count(&mut self, what: &str, min_item_bytes: usize) -> Result<usize> {
        let n = self.u64()?;
        let left = (self.bytes.len() - self.at) as u64;
        if n > left / min_item_bytes.max(1) as u64 {
            return Err(self.bad(format!("{what} {n} cannot fit in the {left} bytes left")));
        }
        Ok(n as usize)
    }

    pub fn string(&mut self) -> Result<String> {
        let len = self.count("string length", 1)?;
        let at = self.at;
        let s = self.take(len)?;
        String::from_utf8(s.to_vec()).map_err(|_| self.bad(format!("the string at byte {at} is not UTF-8")))
    }

    pub fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::Uint(self.take(1)?[0] as u64),
            1 => MetaValue::Int(self.take(1)?[0] as i8 as i64),
            2 => MetaValue::Uint(u16::from_le_bytes(self.take(2)?.try_into().expect("2")) as u64),
            3 => MetaValue::Int(i16::from_le_bytes(self.take(2)?.try_into().expect("2")) as i64),
            4 => MetaValue::Uint(self.u32()? as u64),
            5 => MetaValue::Int(self.u32()? as i32 as i64),
            6 => MetaValue::Float(f32::from_bits(self.u32()?) as f64),
            7 => match self.take(1)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => return Err(self.bad(format!("bool byte {b} is neither 0 nor 1"))),
            },
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth + 1 >= MAX_ARRAY_DEPTH {
                    return Err(self.bad("arrays nested deeper than one level".into()));
                }
                let item = self.u32()?;
                let n = self.count("array length", value_min_bytes(item))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::Uint(self.u64()?),
            11 => MetaValue::Int(self.u64()? as i64),
            12 => MetaValue::Float(f64::from_bits(self.u64()?)),
            t => return Err(self.bad(format!("unknown value type {t}"))),
        })
    }
}

/// The fewest bytes a value of type `ty` takes (a string takes its 8-byte length).
fn value_min_bytes(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 12,
        _ => 1,
    }
}
