//! The part of ONNX's protobuf messages an inference graph needs, encoded by hand (field
//! numbers from `onnx.proto`): a model with one graph of nodes, initialisers, inputs and
//! outputs with (possibly symbolic) shapes.

/// Protobuf wire types.
const VARINT: u64 = 0;
const LEN: u64 = 2;
const FIXED32: u64 = 5;

/// An encoded protobuf message being built field by field.
#[derive(Default, Clone)]
pub struct Msg(pub Vec<u8>);

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

impl Msg {
    fn key(&mut self, field: u64, wire: u64) {
        varint(&mut self.0, (field << 3) | wire);
    }
    /// An integer field (int32 / int64 / enum; negative values as ten-byte varints).
    pub fn int(&mut self, field: u64, v: i64) -> &mut Self {
        self.key(field, VARINT);
        varint(&mut self.0, v as u64);
        self
    }
    /// A float field.
    pub fn float(&mut self, field: u64, v: f32) -> &mut Self {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A bytes / string field.
    pub fn bytes(&mut self, field: u64, v: &[u8]) -> &mut Self {
        self.key(field, LEN);
        varint(&mut self.0, v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    /// A string field.
    pub fn str(&mut self, field: u64, v: &str) -> &mut Self {
        self.bytes(field, v.as_bytes())
    }
    /// An embedded message field.
    pub fn msg(&mut self, field: u64, m: &Msg) -> &mut Self {
        self.bytes(field, &m.0)
    }
}

/// ONNX tensor element types.
pub const FLOAT: i64 = 1;
/// int64.
pub const INT64: i64 = 7;

/// `TensorProto`: a named constant (an initialiser or an attribute value).
pub fn tensor_f32(name: &str, dims: &[usize], data: &[f32]) -> Msg {
    let mut m = Msg::default();
    for &d in dims {
        m.int(1, d as i64);
    }
    m.int(2, FLOAT).str(8, name);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    m.bytes(9, &raw);
    m
}

/// `TensorProto` of int64 values.
pub fn tensor_i64(name: &str, dims: &[usize], data: &[i64]) -> Msg {
    let mut m = Msg::default();
    for &d in dims {
        m.int(1, d as i64);
    }
    m.int(2, INT64).str(8, name);
    let raw: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    m.bytes(9, &raw);
    m
}

/// A dimension of a value's shape: fixed, or a named (dynamic) one.
#[derive(Clone, Debug)]
pub enum Dim {
    /// A fixed size.
    Fixed(usize),
    /// A symbolic size (`"height"`).
    Named(&'static str),
}

/// `ValueInfoProto`: a graph input or output of element type `elem` and `shape`.
pub fn value_info(name: &str, elem: i64, shape: &[Dim]) -> Msg {
    let mut dims = Msg::default();
    for d in shape {
        let mut dm = Msg::default();
        match d {
            Dim::Fixed(n) => dm.int(1, *n as i64),
            Dim::Named(s) => dm.str(2, s),
        };
        dims.msg(1, &dm);
    }
    let mut tensor = Msg::default();
    tensor.int(1, elem).msg(2, &dims);
    let mut ty = Msg::default();
    ty.msg(1, &tensor);
    let mut m = Msg::default();
    m.str(1, name).msg(2, &ty);
    m
}

/// An attribute value of a node.
#[derive(Clone, Debug)]
pub enum Attr {
    /// `INT`.
    Int(i64),
    /// `FLOAT`.
    Float(f32),
    /// `INTS`.
    Ints(Vec<i64>),
    /// `STRING`.
    Str(String),
}

/// `NodeProto`.
pub fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: &[(&str, Attr)],
) -> Msg {
    let mut m = Msg::default();
    for i in inputs {
        m.str(1, i);
    }
    for o in outputs {
        m.str(2, o);
    }
    m.str(3, name).str(4, op);
    for (k, v) in attrs {
        let mut a = Msg::default();
        a.str(1, k);
        match v {
            Attr::Int(i) => {
                a.int(3, *i).int(20, 2);
            }
            Attr::Float(f) => {
                a.float(2, *f).int(20, 1);
            }
            Attr::Ints(is) => {
                for i in is {
                    a.int(8, *i);
                }
                a.int(20, 7);
            }
            Attr::Str(s) => {
                a.bytes(4, s.as_bytes()).int(20, 3);
            }
        }
        m.msg(5, &a);
    }
    m
}

/// A whole `ModelProto`: one graph at `opset` of the default domain, with `metadata`
/// (`metadata_props`, key / value strings runtimes show to users).
#[allow(clippy::too_many_arguments)]
pub fn model(
    graph_name: &str,
    nodes: &[Msg],
    initializers: &[Msg],
    inputs: &[Msg],
    outputs: &[Msg],
    opset: i64,
    doc: &str,
    metadata: &[(&str, String)],
) -> Vec<u8> {
    let mut g = Msg::default();
    for n in nodes {
        g.msg(1, n);
    }
    g.str(2, graph_name);
    for t in initializers {
        g.msg(5, t);
    }
    g.str(10, doc);
    for i in inputs {
        g.msg(11, i);
    }
    for o in outputs {
        g.msg(12, o);
    }
    let mut op = Msg::default();
    op.str(1, "").int(2, opset);
    let mut m = Msg::default();
    // IR version 8 (ONNX 1.10+): every current runtime reads it.
    m.int(1, 8)
        .str(2, "retinanet-rs")
        .str(3, env!("CARGO_PKG_VERSION"))
        .msg(7, &g)
        .msg(8, &op);
    for (k, v) in metadata {
        let mut e = Msg::default();
        e.str(1, k).str(2, v);
        m.msg(14, &e);
    }
    m.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_encode_as_protobuf() {
        let mut v = Vec::new();
        varint(&mut v, 300);
        assert_eq!(v, [0xac, 0x02]);
        let mut m = Msg::default();
        m.int(1, 150);
        assert_eq!(m.0, [0x08, 0x96, 0x01]);
        let mut m = Msg::default();
        m.str(2, "testing");
        assert_eq!(m.0, [0x12, 0x07, b't', b'e', b's', b't', b'i', b'n', b'g']);
        let mut m = Msg::default();
        m.int(3, -1);
        assert_eq!(m.0.len(), 11, "negative ints are ten-byte varints");
    }
}
