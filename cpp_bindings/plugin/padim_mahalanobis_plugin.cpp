// edgead: TensorRT plugin PadimMahalanobis (see padim_mahalanobis_plugin.h for the node contract).
#include "padim_mahalanobis_plugin.h"

#include <cstdio>
#include <cstring>
#include <exception>
#include <new>

#include "edgead/padim_mahalanobis.h"

using namespace nvinfer1;

namespace edgead {
namespace {

constexpr int32_t kNbInputs = 3;
constexpr int32_t kNbOutputs = 1;

void logError(char const* what) noexcept { std::fprintf(stderr, "[edgead] PadimMahalanobis: %s\n", what); }

//! Reads plugin_version / dim / num_patches / whitening_dtype; returns an empty string or the problem.
//! The ONNX parser passes an INT attribute as one kINT32 and a STRING attribute as kCHAR with a trailing NUL
//! counted in the length; a serialized IPluginV3 passes back what getFieldsToSerialize gave.
std::string parseFields(PluginFieldCollection const* fc, PadimParams& params) {
    if (fc == nullptr) return "no plugin fields given (need dim, num_patches and whitening_dtype)";
    bool haveDtype = false;
    for (int32_t i = 0; i < fc->nbFields; ++i) {
        PluginField const& field = fc->fields[i];
        if (field.name == nullptr) continue;
        if (std::strcmp(field.name, "plugin_version") == 0) {
            if (field.type == PluginFieldType::kCHAR && field.data != nullptr) {
                std::string version(static_cast<char const*>(field.data), static_cast<size_t>(field.length));
                version = version.c_str();  // drop a trailing NUL if the length counted it
                if (version != kPluginVersion) return "plugin_version '" + version + "' is not supported (this is 1)";
            }
        } else if (std::strcmp(field.name, "dim") == 0 || std::strcmp(field.name, "num_patches") == 0 ||
                   std::strcmp(field.name, "whitening_dtype") == 0) {
            if (field.type != PluginFieldType::kINT32 || field.data == nullptr || field.length != 1)
                return std::string("field ") + field.name + " must be one int32";
            int32_t value = 0;
            std::memcpy(&value, field.data, sizeof(value));
            if (std::strcmp(field.name, "dim") == 0) {
                params.dim = value;
            } else if (std::strcmp(field.name, "num_patches") == 0) {
                params.numPatches = value;
            } else {
                params.whiteningDtype = value;
                haveDtype = true;
            }
        }
    }
    if (params.dim < 1 || params.dim > EDGEAD_MAX_DIM) return "attribute dim must be in 1.." + std::to_string(EDGEAD_MAX_DIM);
    if (params.numPatches < 1) return "attribute num_patches must be >= 1";
    if (!haveDtype)
        return "field whitening_dtype is missing (the model or engine predates it: re-export the ONNX with this edgead "
               "and rebuild the engine)";
    if (params.whiteningDtype != kOnnxFloat && params.whiteningDtype != kOnnxFloat16)
        return "attribute whitening_dtype must be 1 (float32) or 10 (float16), got " +
               std::to_string(params.whiteningDtype);
    return std::string();
}

//! parseFields for both creators: logs the problem and returns false when the fields are unusable.
bool parseFieldsOrLog(PluginFieldCollection const* fc, PadimParams& params) {
    std::string const problem = parseFields(fc, params);
    if (!problem.empty()) logError(problem.c_str());
    return problem.empty();
}

DataType whiteningType(PadimParams const& p) { return p.whiteningDtype == kOnnxFloat16 ? DataType::kHALF : DataType::kFLOAT; }

//! Shape check of (embedding [N, D, P], mean [P, D], whitening [P, T]); -1 (dynamic) entries pass when
//! `allowDynamic` (build time), never at run time.
std::string shapeProblem(Dims const& x, Dims const& mean, Dims const& w, PadimParams const& p, bool allowDynamic) {
    auto match = [allowDynamic](int64_t actual, int64_t expected) {
        return actual == expected || (allowDynamic && actual < 0);
    };
    int64_t const tri = static_cast<int64_t>(p.dim) * (p.dim + 1) / 2;
    if (x.nbDims != 3 || !match(x.d[1], p.dim) || !match(x.d[2], p.numPatches) || (!allowDynamic && x.d[0] < 0))
        return "input 0 (embedding) must be [N, " + std::to_string(p.dim) + ", " + std::to_string(p.numPatches) + "]";
    if (mean.nbDims != 2 || !match(mean.d[0], p.numPatches) || !match(mean.d[1], p.dim))
        return "input 1 (mean) must be [" + std::to_string(p.numPatches) + ", " + std::to_string(p.dim) + "]";
    if (w.nbDims != 2 || !match(w.d[0], p.numPatches) || !match(w.d[1], tri))
        return "input 2 (whitening_packed) must be [" + std::to_string(p.numPatches) + ", " + std::to_string(tri) + "]";
    return std::string();
}

//! fp32 linear everywhere, except the packed whitening (pos 2): linear, in the dtype the file stored.
bool formatSupported(int32_t pos, DataType type, TensorFormat format, PadimParams const& params) {
    if (format != TensorFormat::kLINEAR) return false;
    if (pos == 2) return type == whiteningType(params);
    return pos >= 0 && pos < kNbInputs + kNbOutputs && type == DataType::kFLOAT;
}

//! Checks the run-time descriptors against the node (shapes and types), then launches the kernel.
int32_t runKernel(PadimParams const& params, PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, cudaStream_t stream) noexcept {
    if (inputDesc == nullptr || outputDesc == nullptr || inputs == nullptr || outputs == nullptr) {
        logError("enqueue called without tensors");
        return -1;
    }
    std::string const problem = shapeProblem(inputDesc[0].dims, inputDesc[1].dims, inputDesc[2].dims, params, false);
    if (!problem.empty()) {
        logError(problem.c_str());
        return -1;
    }
    if (inputDesc[0].type != DataType::kFLOAT || inputDesc[1].type != DataType::kFLOAT ||
        inputDesc[2].type != whiteningType(params) || outputDesc[0].type != DataType::kFLOAT) {
        logError("tensor types differ from the node (embedding, mean and distance float32; whitening_packed as "
                 "whitening_dtype)");
        return -1;
    }
    Dims const& x = inputDesc[0].dims;
    if (outputDesc[0].dims.nbDims != 2 || outputDesc[0].dims.d[0] != x.d[0] || outputDesc[0].dims.d[1] != x.d[2]) {
        logError("output 0 (distance) must be [N, num_patches]");
        return -1;
    }
    if (x.d[0] > 0x7fffffff) {
        logError("batch too large");
        return -1;
    }
    int32_t const n = static_cast<int32_t>(x.d[0]);
    if (n == 0) return 0;
    int const status = edgead_padim_mahalanobis(
        static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]), inputs[2],
        params.whiteningDtype == kOnnxFloat16 ? 1 : 0, static_cast<float*>(outputs[0]), n, params.dim,
        params.numPatches, stream);
    if (status != EDGEAD_OK) {
        logError(edgead_status_string(status));
        return -1;
    }
    return 0;
}

void fillFieldNames(std::vector<PluginField>& fields, PluginFieldCollection& collection) {
    fields.clear();
    fields.emplace_back("plugin_version", nullptr, PluginFieldType::kCHAR, 1);
    fields.emplace_back("dim", nullptr, PluginFieldType::kINT32, 1);
    fields.emplace_back("num_patches", nullptr, PluginFieldType::kINT32, 1);
    fields.emplace_back("whitening_dtype", nullptr, PluginFieldType::kINT32, 1);
    collection.nbFields = static_cast<int32_t>(fields.size());
    collection.fields = fields.data();
}

}  // namespace

#if EDGEAD_TRT_V3

// ------------------------------------------------------------------------------------------- IPluginV3

PadimMahalanobisPlugin::PadimMahalanobisPlugin(PadimParams params) : mParams(params) {}

IPluginCapability* PadimMahalanobisPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
        case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
        case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
        case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

IPluginV3* PadimMahalanobisPlugin::clone() noexcept {
    return new (std::nothrow) PadimMahalanobisPlugin(mParams);
}

char const* PadimMahalanobisPlugin::getPluginName() const noexcept { return kPluginName; }
char const* PadimMahalanobisPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
char const* PadimMahalanobisPlugin::getPluginNamespace() const noexcept { return ""; }

int32_t PadimMahalanobisPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                                DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        logError("expects 3 inputs and 1 output");
        return -1;
    }
    std::string const problem = shapeProblem(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims, mParams, true);
    if (!problem.empty()) {
        logError(problem.c_str());
        return -1;
    }
    return 0;
}

int32_t PadimMahalanobisPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs,
                                                   DataType const*, int32_t nbInputs) const noexcept {
    if (nbOutputs != kNbOutputs || nbInputs != kNbInputs) return -1;
    outputTypes[0] = DataType::kFLOAT;
    return 0;
}

int32_t PadimMahalanobisPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
                                                DimsExprs const*, int32_t, DimsExprs* outputs, int32_t nbOutputs,
                                                IExprBuilder&) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[0].nbDims != 3) {
        logError("input 0 must be [N, dim, num_patches]");
        return -1;
    }
    outputs[0].nbDims = 2;
    outputs[0].d[0] = inputs[0].d[0];
    outputs[0].d[1] = inputs[0].d[2];
    return 0;
}

bool PadimMahalanobisPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut,
                                                       int32_t nbInputs, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return false;
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    return formatSupported(pos, inOut[pos].desc.type, inOut[pos].desc.format, mParams);
}

int32_t PadimMahalanobisPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

size_t PadimMahalanobisPlugin::getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t,
                                                DynamicPluginTensorDesc const*, int32_t) const noexcept {
    return 0;
}

int32_t PadimMahalanobisPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs,
                                              PluginTensorDesc const*, int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    // concrete shapes are expected here; enqueue() checks them strictly again
    std::string const problem = shapeProblem(in[0].dims, in[1].dims, in[2].dims, mParams, true);
    if (!problem.empty()) {
        logError(problem.c_str());
        return -1;
    }
    return 0;
}

int32_t PadimMahalanobisPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                        void const* const* inputs, void* const* outputs, void*,
                                        cudaStream_t stream) noexcept {
    return runKernel(mParams, inputDesc, outputDesc, inputs, outputs, stream);
}

IPluginV3* PadimMahalanobisPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* PadimMahalanobisPlugin::getFieldsToSerialize() noexcept {
    mSerialFields.clear();
    mSerialFields.emplace_back("dim", &mParams.dim, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("num_patches", &mParams.numPatches, PluginFieldType::kINT32, 1);
    mSerialFields.emplace_back("whitening_dtype", &mParams.whiteningDtype, PluginFieldType::kINT32, 1);
    mSerialCollection.nbFields = static_cast<int32_t>(mSerialFields.size());
    mSerialCollection.fields = mSerialFields.data();
    return &mSerialCollection;
}

PadimMahalanobisPluginCreator::PadimMahalanobisPluginCreator() { fillFieldNames(mFields, mCollection); }
char const* PadimMahalanobisPluginCreator::getPluginName() const noexcept { return kPluginName; }
char const* PadimMahalanobisPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
char const* PadimMahalanobisPluginCreator::getPluginNamespace() const noexcept { return ""; }
PluginFieldCollection const* PadimMahalanobisPluginCreator::getFieldNames() noexcept { return &mCollection; }

IPluginV3* PadimMahalanobisPluginCreator::createPlugin(char const*, PluginFieldCollection const* fc,
                                                       TensorRTPhase) noexcept {
    try {
        PadimParams params;
        if (!parseFieldsOrLog(fc, params)) return nullptr;
        return new PadimMahalanobisPlugin(params);
    } catch (std::exception const& e) {
        logError(e.what());
    }
    return nullptr;
}

#else  // ------------------------------------------------------------- IPluginV2DynamicExt (TensorRT 8.5/8.6)

PadimMahalanobisPlugin::PadimMahalanobisPlugin(PadimParams params) : mParams(params) {}

IPluginV2DynamicExt* PadimMahalanobisPlugin::clone() const noexcept {
    auto* plugin = new (std::nothrow) PadimMahalanobisPlugin(mParams);
    if (plugin != nullptr) {
        plugin->setPluginNamespace(mNamespace.c_str());
        plugin->mShapeProblem = mShapeProblem;
    }
    return plugin;
}

DimsExprs PadimMahalanobisPlugin::getOutputDimensions(int32_t outputIndex, DimsExprs const* inputs,
                                                      int32_t nbInputs, IExprBuilder&) noexcept {
    DimsExprs out{};
    if (outputIndex != 0 || nbInputs != kNbInputs || inputs[0].nbDims != 3) {
        logError("input 0 must be [N, dim, num_patches]");
        out.nbDims = -1;
        return out;
    }
    out.nbDims = 2;
    out.d[0] = inputs[0].d[0];
    out.d[1] = inputs[0].d[2];
    return out;
}

bool PadimMahalanobisPlugin::supportsFormatCombination(int32_t pos, PluginTensorDesc const* inOut, int32_t nbInputs,
                                                       int32_t nbOutputs) noexcept {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return false;
    if (pos < 0 || pos >= nbInputs + nbOutputs) return false;
    return formatSupported(pos, inOut[pos].type, inOut[pos].format, mParams);
}

void PadimMahalanobisPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                             DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
    // IPluginV2DynamicExt::configurePlugin cannot fail: remember the problem; initialize() then fails the engine
    // build / deserialization and enqueue() refuses to launch (the 10.x path fails in configurePlugin itself).
    mShapeProblem.clear();
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) {
        mShapeProblem = "expects 3 inputs and 1 output";
    } else {
        mShapeProblem = shapeProblem(in[0].desc.dims, in[1].desc.dims, in[2].desc.dims, mParams, true);
    }
    if (!mShapeProblem.empty()) logError(mShapeProblem.c_str());
}

size_t PadimMahalanobisPlugin::getWorkspaceSize(PluginTensorDesc const*, int32_t, PluginTensorDesc const*,
                                                int32_t) const noexcept {
    return 0;
}

int32_t PadimMahalanobisPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
                                        void const* const* inputs, void* const* outputs, void*,
                                        cudaStream_t stream) noexcept {
    if (!mShapeProblem.empty()) {
        logError(mShapeProblem.c_str());
        return -1;
    }
    return runKernel(mParams, inputDesc, outputDesc, inputs, outputs, stream);
}

DataType PadimMahalanobisPlugin::getOutputDataType(int32_t, DataType const*, int32_t) const noexcept {
    return DataType::kFLOAT;
}

char const* PadimMahalanobisPlugin::getPluginType() const noexcept { return kPluginName; }
char const* PadimMahalanobisPlugin::getPluginVersion() const noexcept { return kPluginVersion; }
int32_t PadimMahalanobisPlugin::getNbOutputs() const noexcept { return kNbOutputs; }
int32_t PadimMahalanobisPlugin::initialize() noexcept {
    if (mShapeProblem.empty()) return 0;
    logError(mShapeProblem.c_str());
    return -1;
}
void PadimMahalanobisPlugin::terminate() noexcept {}
// Serialized form: int32 dim, num_patches, whitening_dtype (12 bytes, host byte order).
size_t PadimMahalanobisPlugin::getSerializationSize() const noexcept { return 3 * sizeof(int32_t); }

void PadimMahalanobisPlugin::serialize(void* buffer) const noexcept {
    int32_t const values[3] = {mParams.dim, mParams.numPatches, mParams.whiteningDtype};
    std::memcpy(buffer, values, sizeof(values));
}

void PadimMahalanobisPlugin::destroy() noexcept { delete this; }
void PadimMahalanobisPlugin::setPluginNamespace(char const* ns) noexcept { mNamespace = ns != nullptr ? ns : ""; }
char const* PadimMahalanobisPlugin::getPluginNamespace() const noexcept { return mNamespace.c_str(); }

PadimMahalanobisPluginCreator::PadimMahalanobisPluginCreator() { fillFieldNames(mFields, mCollection); }
char const* PadimMahalanobisPluginCreator::getPluginName() const noexcept { return kPluginName; }
char const* PadimMahalanobisPluginCreator::getPluginVersion() const noexcept { return kPluginVersion; }
PluginFieldCollection const* PadimMahalanobisPluginCreator::getFieldNames() noexcept { return &mCollection; }

IPluginV2* PadimMahalanobisPluginCreator::createPlugin(char const*, PluginFieldCollection const* fc) noexcept {
    try {
        PadimParams params;
        if (!parseFieldsOrLog(fc, params)) return nullptr;
        auto* plugin = new PadimMahalanobisPlugin(params);
        plugin->setPluginNamespace(mNamespace.c_str());
        return plugin;
    } catch (std::exception const& e) {
        logError(e.what());
    }
    return nullptr;
}

IPluginV2* PadimMahalanobisPluginCreator::deserializePlugin(char const*, void const* serialData,
                                                            size_t serialLength) noexcept {
    try {
        if (serialData == nullptr || serialLength != 3 * sizeof(int32_t)) {
            logError("serialized plugin data has the wrong size (engine built by another edgead version? rebuild it)");
            return nullptr;
        }
        int32_t values[3];
        std::memcpy(values, serialData, sizeof(values));
        // the same checks as the fields of a node (one int32 each)
        PluginField fields[3] = {PluginField("dim", &values[0], PluginFieldType::kINT32, 1),
                                 PluginField("num_patches", &values[1], PluginFieldType::kINT32, 1),
                                 PluginField("whitening_dtype", &values[2], PluginFieldType::kINT32, 1)};
        PluginFieldCollection collection{};
        collection.nbFields = 3;
        collection.fields = fields;
        PadimParams params;
        if (!parseFieldsOrLog(&collection, params)) return nullptr;
        auto* plugin = new PadimMahalanobisPlugin(params);
        plugin->setPluginNamespace(mNamespace.c_str());
        return plugin;
    } catch (std::exception const& e) {
        logError(e.what());
    }
    return nullptr;
}

void PadimMahalanobisPluginCreator::setPluginNamespace(char const* ns) noexcept { mNamespace = ns != nullptr ? ns : ""; }
char const* PadimMahalanobisPluginCreator::getPluginNamespace() const noexcept { return mNamespace.c_str(); }

#endif  // EDGEAD_TRT_V3

// Registered in plugin namespace "" as soon as the library is loaded (ctypes, trtexec --plugins/--staticPlugins).
REGISTER_TENSORRT_PLUGIN(PadimMahalanobisPluginCreator);

}  // namespace edgead
