// The entry-point table of one ISA copy (see kernels.h); compiled per ISA.
#include "kernels.h"

namespace sp {
namespace SP_ISA_NS {

extern const cpu::Kernels kernels = {&pairwise_sqdist, &knn, &lof, &kcenter_greedy};

}  // namespace SP_ISA_NS
}  // namespace sp
