//! Digests of module parameters, to show that what must not change did not (bit for bit).

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Tensor, backend::Backend};

/// FNV-1a over the bytes of every float parameter, in visiting order.
struct Fnv {
    hash: u64,
}

impl Fnv {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.hash ^= b as u64;
            self.hash = self.hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl<B: Backend> ModuleVisitor<B> for Fnv {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let data = param.val().into_data();
        for d in data.shape.iter() {
            self.feed(&d.to_le_bytes());
        }
        self.feed(data.as_bytes());
    }
}

/// A 64-bit digest of every float parameter of `module` (shapes and exact bytes).
pub fn fingerprint<B: Backend, M: Module<B>>(module: &M) -> u64 {
    let mut fnv = Fnv {
        hash: 0xcbf2_9ce4_8422_2325,
    };
    module.visit(&mut fnv);
    fnv.hash
}
