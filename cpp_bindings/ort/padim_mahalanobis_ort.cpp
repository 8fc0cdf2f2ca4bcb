// edgead: ONNX Runtime custom-op library for edgead::PadimMahalanobis (CPU execution provider).
//
// The same node the TensorRT plugin implements (exporters/onnx_head.py, docs/CONTRACTS.md):
//   inputs  embedding [N, D, P] float32, mean [P, D] float32, whitening_packed [P, T] float16|float32
//   output  distance  [N, P] float32,  distance[n, p] = || W_p (embedding[n, :, p] - mean[p]) ||
//   attrs   dim = D, num_patches = P (int64, checked against the shapes)
// so a `--mahalanobis plugin` export runs on ONNX Runtime CPU with the packed fp16 triangle read once per
// frame (the standard-op flavour has ONNX Runtime expand it to dense fp32 blocks, 3.7x the bytes).
// The patch axis is split over ONNX Runtime's own intra-op threads (KernelContext_ParallelFor), so the
// session's thread setting holds. Load with SessionOptions.register_custom_ops_library(path).
//
// Build: make ort-ops ORT_INCLUDE=<folder with onnxruntime_c_api.h> (ORT_API_VERSION >= 16, ORT >= 1.16).
// Needs no onnxruntime library at link time: the API table comes from RegisterCustomOps' OrtApiBase.
#include <climits>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"

#define EDGEAD_CPU_ONLY
#include "edgead/padim_mahalanobis.h"
#include "edgead/padim_mahalanobis_cpu.h"

#if ORT_API_VERSION < 16
#error "edgead's ONNX Runtime op needs onnxruntime_c_api.h with ORT_API_VERSION >= 16 (ONNX Runtime 1.16+)"
#endif

namespace {

const OrtApi* g_api = nullptr;
constexpr int kChunkPatches = 64;  // patches per parallel task (a multiple of the kernel's 16-patch tile)

struct Kernel {
    int64_t dim = 0;
    int64_t num_patches = 0;
    int64_t whitening_dtype = 0;  // ONNX type code of whitening_packed from the node (0 = not recorded)
};

struct Shape {
    ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    std::vector<int64_t> dims;
};

OrtStatus* shape_of(const OrtValue* value, Shape* out) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    if (OrtStatus* status = g_api->GetTensorTypeAndShape(value, &info)) return status;
    size_t rank = 0;
    OrtStatus* status = g_api->GetTensorElementType(info, &out->type);
    if (!status) status = g_api->GetDimensionsCount(info, &rank);
    if (!status) {
        out->dims.assign(rank, 0);
        status = g_api->GetDimensions(info, out->dims.data(), rank);
    }
    g_api->ReleaseTensorTypeAndShapeInfo(info);
    return status;
}

OrtStatus* invalid(const std::string& what) {
    return g_api->CreateStatus(ORT_INVALID_ARGUMENT, ("edgead::PadimMahalanobis: " + what).c_str());
}

std::string dims_text(const std::vector<int64_t>& dims) {
    std::string text = "[";
    for (size_t i = 0; i < dims.size(); ++i) text += (i ? ", " : "") + std::to_string(dims[i]);
    return text + "]";
}

struct Task {
    const float* x;
    const float* mean;
    const void* w;
    int w_is_half;
    float* out;
    int n, d, p;
    int status;
};

void run_chunk(void* user, size_t chunk) {
    Task* task = static_cast<Task*>(user);
    const int begin = (int)chunk * kChunkPatches;
    const int end = begin + kChunkPatches < task->p ? begin + kChunkPatches : task->p;
    const int rc = edgead_padim_mahalanobis_cpu_range(task->x, task->mean, task->w, task->w_is_half, task->out,
                                                      task->n, task->d, task->p, begin, end);
    if (rc != EDGEAD_OK) task->status = rc;  // any failing chunk reports (all fail alike: same arguments)
}

// ---- OrtCustomOp callbacks ------------------------------------------------------------------------------
const char* ORT_API_CALL op_name(const OrtCustomOp*) { return "PadimMahalanobis"; }
const char* ORT_API_CALL op_provider(const OrtCustomOp*) { return "CPUExecutionProvider"; }
size_t ORT_API_CALL op_input_count(const OrtCustomOp*) { return 3; }
size_t ORT_API_CALL op_output_count(const OrtCustomOp*) { return 1; }
ONNXTensorElementDataType ORT_API_CALL op_input_type(const OrtCustomOp*, size_t index) {
    // whitening_packed is float16 or float32 (checked at run time); the rest float32
    return index == 2 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
ONNXTensorElementDataType ORT_API_CALL op_output_type(const OrtCustomOp*, size_t) {
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL op_required(const OrtCustomOp*, size_t) {
    return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL op_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL op_min_arity(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_homogeneous(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_start_version(const OrtCustomOp*) { return 1; }
int ORT_API_CALL op_end_version(const OrtCustomOp*) { return INT_MAX; }
void ORT_API_CALL op_destroy(void* kernel) { delete static_cast<Kernel*>(kernel); }

OrtStatusPtr ORT_API_CALL op_create(const OrtCustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
    Kernel* kernel = new Kernel();
    OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, "dim", &kernel->dim);
    if (!status) status = g_api->KernelInfoGetAttribute_int64(info, "num_patches", &kernel->num_patches);
    if (status) {
        delete kernel;
        return status;
    }
    // whitening_dtype (ONNX type code of whitening_packed as stored) is optional here: exports before it existed
    // still run, the tensor's own type decides; when present it must match the tensor (checked in compute).
    kernel->whitening_dtype = 0;
    if (OrtStatus* missing = g_api->KernelInfoGetAttribute_int64(info, "whitening_dtype", &kernel->whitening_dtype)) {
        g_api->ReleaseStatus(missing);
        kernel->whitening_dtype = 0;
    } else if (kernel->whitening_dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT &&
               kernel->whitening_dtype != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) {
        const std::string text = "attribute whitening_dtype=" + std::to_string(kernel->whitening_dtype) +
                                 " must be 1 (float32) or 10 (float16)";
        delete kernel;
        return invalid(text);
    }
    if (kernel->dim < 1 || kernel->dim > EDGEAD_MAX_DIM || kernel->num_patches < 1) {
        const std::string text = "attributes dim=" + std::to_string(kernel->dim) + ", num_patches=" +
                                 std::to_string(kernel->num_patches) + " out of range";
        delete kernel;
        return invalid(text);
    }
    *out = kernel;
    return nullptr;
}

OrtStatusPtr ORT_API_CALL op_compute(void* kernel_ptr, OrtKernelContext* context) {
    const Kernel& kernel = *static_cast<Kernel*>(kernel_ptr);
    const OrtValue* inputs[3] = {nullptr, nullptr, nullptr};
    Shape shapes[3];
    for (size_t i = 0; i < 3; ++i) {
        if (OrtStatus* status = g_api->KernelContext_GetInput(context, i, &inputs[i])) return status;
        if (OrtStatus* status = shape_of(inputs[i], &shapes[i])) return status;
    }
    const int64_t dim = kernel.dim, patches = kernel.num_patches, tri = dim * (dim + 1) / 2;
    const std::vector<int64_t>& xs = shapes[0].dims;
    if (xs.size() != 3 || xs[1] != dim || xs[2] != patches || xs[0] < 1)
        return invalid("embedding must be [N, " + std::to_string(dim) + ", " + std::to_string(patches) + "], got " +
                       dims_text(xs));
    if (shapes[1].dims != std::vector<int64_t>{patches, dim})
        return invalid("mean must be [" + std::to_string(patches) + ", " + std::to_string(dim) + "], got " +
                       dims_text(shapes[1].dims));
    if (shapes[2].dims != std::vector<int64_t>{patches, tri})
        return invalid("whitening_packed must be [" + std::to_string(patches) + ", " + std::to_string(tri) +
                       "], got " + dims_text(shapes[2].dims));
    const ONNXTensorElementDataType w_type = shapes[2].type;
    if (w_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 && w_type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        return invalid("whitening_packed must be float16 or float32");
    if (kernel.whitening_dtype != 0 && w_type != kernel.whitening_dtype)
        return invalid("whitening_packed is " + std::string(w_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? "float16" : "float32") +
                       " but the node's whitening_dtype says " + (kernel.whitening_dtype == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 ? "float16" : "float32"));
    if (xs[0] > INT_MAX / 2) return invalid("batch too large");

    const int64_t out_dims[2] = {xs[0], patches};
    OrtValue* output = nullptr;
    if (OrtStatus* status = g_api->KernelContext_GetOutput(context, 0, out_dims, 2, &output)) return status;
    Task task{};
    void* data = nullptr;
    if (OrtStatus* status = g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[0]), &data)) return status;
    task.x = static_cast<const float*>(data);
    if (OrtStatus* status = g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[1]), &data)) return status;
    task.mean = static_cast<const float*>(data);
    if (OrtStatus* status = g_api->GetTensorMutableData(const_cast<OrtValue*>(inputs[2]), &data)) return status;
    task.w = data;
    if (OrtStatus* status = g_api->GetTensorMutableData(output, &data)) return status;
    task.out = static_cast<float*>(data);
    task.w_is_half = w_type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    task.n = (int)xs[0];
    task.d = (int)dim;
    task.p = (int)patches;
    task.status = EDGEAD_OK;
    const size_t chunks = (size_t)((patches + kChunkPatches - 1) / kChunkPatches);
    if (OrtStatus* status = g_api->KernelContext_ParallelFor(context, run_chunk, chunks, 0, &task)) return status;
    if (task.status != EDGEAD_OK) return invalid(edgead_status_string(task.status));
    return nullptr;
}

OrtCustomOp make_op() {
    OrtCustomOp op{};  // every member not set below stays null / zero
    op.version = ORT_API_VERSION;
    op.GetName = op_name;
    op.GetExecutionProviderType = op_provider;
    op.GetInputType = op_input_type;
    op.GetInputTypeCount = op_input_count;
    op.GetOutputType = op_output_type;
    op.GetOutputTypeCount = op_output_count;
    op.KernelDestroy = op_destroy;
    op.GetInputCharacteristic = op_required;
    op.GetOutputCharacteristic = op_required;
    op.GetInputMemoryType = op_memory_type;
    op.GetVariadicInputMinArity = op_min_arity;
    op.GetVariadicInputHomogeneity = op_homogeneous;
    op.GetVariadicOutputMinArity = op_min_arity;
    op.GetVariadicOutputHomogeneity = op_homogeneous;
    op.CreateKernelV2 = op_create;
    op.KernelComputeV2 = op_compute;
#if ORT_API_VERSION >= 17
    op.GetStartVersion = op_start_version;
    op.GetEndVersion = op_end_version;
#endif
    return op;
}

OrtCustomOp g_op = make_op();

}  // namespace

// Entry point ONNX Runtime calls from SessionOptions.register_custom_ops_library / RegisterCustomOpsLibrary.
extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
    const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
    if (api == nullptr) {  // the loaded onnxruntime is older than the headers this library was built with
        const std::string text = std::string("libedgead_ort: needs ONNX Runtime API version ") +
                                 std::to_string(ORT_API_VERSION) + " or newer, this onnxruntime is " +
                                 api_base->GetVersionString();
        return api_base->GetApi(1)->CreateStatus(ORT_FAIL, text.c_str());
    }
    g_api = api;
    OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions keep pointers into it
    if (OrtStatus* status = g_api->CreateCustomOpDomain("edgead", &domain)) return status;
    if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, &g_op)) return status;
    return g_api->AddCustomOpDomain(options, domain);
}
